# On the GPU host: follow the detached sweep for $1 seconds (or until it ends), then copy the results JSON and the
# sweep log to $OUT (and the eval dirs' archive once the sweep wrote it: --export /tmp/res), so every call
# brings back what has finished so far.
end=$(( $(date +%s) + $1 )); while [ "$(date +%s)" -lt $end ] && pgrep -f method_compare.py >/dev/null; do sleep 10; done
grep -E "start|done|FAILED|stopped" /tmp/sweep.log | tail -40; tail -3 /tmp/sweep.log
nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv
for f in /tmp/mc/logs/train-*.log; do echo "$f: $(grep -o "[0-9]*/[0-9]* \[" "$f" | tail -1)"; done 2>/dev/null | tail -14
for f in /tmp/mc/logs/*.log; do grep -l Traceback "$f" >/dev/null 2>&1 && { echo "== $f"; grep -A3 -E "Error|error:" "$f" | tail -8; }; done
cp /tmp/res/*.json /tmp/res/*.tar.xz /tmp/sweep.log "$OUT"/ 2>/dev/null; ls "$OUT"
