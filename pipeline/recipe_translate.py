"""A recipe's sections translated into the libraries' configs: trl.SFTConfig keyword arguments, the PEFT config.
(The 4-bit BitsAndBytesConfig is built by pipeline.adapter_meta.QuantInfo, for training and merging alike.)"""

from __future__ import annotations


def sft_config_kwargs(recipe) -> dict:
    """Keyword arguments for trl.SFTConfig (names checked against trl 1.16)."""
    t = recipe.training
    return dict(
        output_dir=str(recipe.run_dir),
        run_name=recipe.name,
        seed=recipe.seed,
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type,
        # transformers 5 has no warmup_ratio: a float in [0, 1) in warmup_steps is read as a ratio.
        warmup_steps=t.warmup_ratio if t.warmup_ratio > 0 else t.warmup_steps,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optim,
        bf16=t.bf16,  # explicit: SFTConfig's None means bf16 on
        fp16=t.fp16,
        # transformers 5.23 renamed gradient_checkpointing (a deprecated alias now, default True in SFTConfig)
        activation_checkpointing=t.gradient_checkpointing,
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        eval_strategy="steps" if recipe.has_eval else "no",
        eval_steps=(t.eval_steps or t.save_steps) if recipe.has_eval else None,
        report_to=t.report_to,
        dataloader_num_workers=t.dataloader_num_workers,
        activation_checkpointing_kwargs=({"every_n_layers": t.checkpoint_every_n_layers}
                                         if t.gradient_checkpointing and t.checkpoint_every_n_layers > 1 else None),
        use_liger_kernel=t.liger_kernel,
        torch_compile=t.torch_compile,
        max_length=recipe.data.max_length,
        dataset_num_proc=recipe.data.num_proc,
        completion_only_loss=True,  # prompt/completion rows: loss on the solution only
        # training.padding_free is applied to the trainer's collator (trainer.make_trainer), not here: TRL 1.16
        # refuses padding_free without packing when max_length is set, though it truncates to max_length itself
        packing=False,
    )


def build_peft_config(adapter):
    """The PEFT config for an adapter section (a resolved one: defaults filled by load_recipe); None for full."""
    if adapter.method == "full":
        return None
    alpha = adapter.lora_alpha if adapter.lora_alpha is not None else adapter.r
    if adapter.uses_svd:
        from pipeline.edora import EdoraConfig

        return EdoraConfig(r=adapter.r, lora_alpha=alpha, target_modules=list(adapter.target_modules),
                           dropout=adapter.dropout, init_sigma=adapter.init_sigma, svd_method=adapter.svd_method,
                           svd_niter=adapter.svd_niter, svd_target=adapter.svd_target,
                           use_magnitude=adapter.method == "edora", seed=adapter.seed, task_type="CAUSAL_LM")
    from peft import LoraConfig

    return LoraConfig(r=adapter.r, lora_alpha=alpha, lora_dropout=adapter.dropout,
                      target_modules=list(adapter.target_modules), use_dora=adapter.method == "dora",
                      task_type="CAUSAL_LM")
