# On the GPU host, third of three back-to-back calls (1: wheels + data, 2: model piece 1; see benchmarks/README.md):
# joins SmolLM2's GGUF pieces, converts it to an fp32 HF dir (/tmp/smol), then starts method_compare.py DETACHED
# (setsid) with the given arguments, so the sweep runs on across calls while the machine stays held.
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p /tmp/res && { [ -d .gpu/res ] && cp .gpu/res/*.json /tmp/res/ || true; }
mv .gpu/m2/* /tmp/model/ && g=$(bash .gpu/model-join.sh) || exit 1
python3 - "$g" <<'P'
import sys
from pipeline.modeling import load_model, load_tokenizer
m = load_model(sys.argv[1], dtype="float32"); m.save_pretrained("/tmp/smol"); load_tokenizer(sys.argv[1]).save_pretrained("/tmp/smol")
print("converted", sum(p.numel() for p in m.parameters()))
P
# the project copy is replaced on every call: run from a stable copy
rm -rf /tmp/repo && mkdir /tmp/repo && cp -r . /tmp/repo/ && cd /tmp/repo
setsid nohup python3 benchmarks/method_compare.py "$@" > /tmp/sweep.log 2>&1 < /dev/null &
echo started
