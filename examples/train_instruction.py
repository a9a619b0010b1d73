"""Phase 2, instruction tuning: the decoder trains with the projector and Vision Remember; the vision tower is frozen.

The paper's settings are the defaults: learning rate 2e-4, global batch 32, cosine schedule, one epoch, loss on the
assistant's answers only. `trl.SFTTrainer` trains; every `SFTConfig` flag works and overrides these defaults. With
`--lora`, the decoder trains through LoRA adapters on its projections while the projector and Vision Remember train in
full (`vr_hf.lora`); `--qlora` loads the decoder in 4-bit NF4 (bitsandbytes).
"""

import os

import torch

from vr_hf.lora import lora_config, lora_summary, qlora_quantization_config, save_merged
from vr_hf.recipes import (
    RecipeTrainer,
    groups_summary,
    parse_recipe_args,
    recipe_data,
    recipe_model,
    recipe_model_card,
    recipe_parser,
    train_and_save,
)
from vr_hf.training import parts_optimizer, trainable_parameter_groups


EXAMPLES = """examples:
  # the phase-1 checkpoint on LLaVA-style JSON (LLaVA-NeXT's instruction data, say)
  python examples/train_instruction.py --model llava-vr-aligned --data llava_next_779k.json \\
      --image_folder images --output_dir llava-vr-instruct

  # LoRA (rank 64) on 2 GPUs, merged back into a remote-code checkpoint in llava-vr-lora/merged
  accelerate launch --config_file examples/accelerate/ddp.yaml --num_processes 2 examples/train_instruction.py \\
      --model llava-vr-aligned --data llava_next_779k.json --image_folder images --output_dir llava-vr-lora \\
      --lora --lora_rank 64 --merge

  # evaluate every 500 steps on held-out rows, push the result to the Hub
  python examples/train_instruction.py --model llava-vr-aligned --data train.json --eval_data held_out.json \\
      --image_folder images --output_dir llava-vr-instruct --eval_strategy steps --eval_steps 500 --push_to_hub

  # resume the latest checkpoint in the output folder
  python examples/train_instruction.py --model llava-vr-aligned --data rows.json --output_dir llava-vr-instruct \\
      --resume_from_checkpoint latest

  # a tiny random model, to check the setup on a CPU in seconds
  python examples/train_instruction.py --tiny --data rows.json --output_dir /tmp/instruct --max_steps 2 \\
      --global_batch_size 2 --per_device_train_batch_size 2
"""


def parse_args(argv=None):
    parser = recipe_parser(
        __doc__, EXAMPLES, lora=True, learning_rate=2e-4, global_batch_size=32, per_device_train_batch_size=4
    )
    return parse_recipe_args(parser, argv)


def build_trainer(recipe, lora, training_args) -> RecipeTrainer:
    train_dataset, eval_dataset = recipe_data(recipe, training_args)
    quantization = {}
    if lora.qlora:  # the 4-bit layers and the rest of the model in the training precision
        dtype = torch.bfloat16 if training_args.bf16 else torch.float16
        quantization = {"quantization_config": qlora_quantization_config(dtype), "dtype": dtype}
    model, processor = recipe_model(recipe, training_args.seed, **quantization)
    if lora.lora:  # PEFT freezes everything but the adapters and the modules it saves
        peft_config = lora_config(model, lora.lora_rank, lora.lora_alpha, lora.lora_dropout)
        training = dict(peft_config=peft_config)
        summary = (
            f"Phase 2 (instruction tuning) with {'QLoRA (4-bit NF4 decoder)' if lora.qlora else 'LoRA'} at "
            f"{training_args.learning_rate:g}: {lora_summary(model, peft_config)}."
        )
    else:
        rates = recipe.learning_rates("instruction", training_args.learning_rate)
        groups = trainable_parameter_groups(
            model, rates
        )  # freezes the vision tower before the Trainer wraps the model
        trained = groups_summary(groups)
        training = dict(optimizer_cls_and_kwargs=parts_optimizer(rates))
        summary = f"Phase 2 (instruction tuning): trained {trained}; everything else frozen."

    return RecipeTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processor,
        recipe=recipe,
        summary=summary,
        adapter=lora.lora,
        **training,
    )


def main(argv=None) -> RecipeTrainer:
    recipe, lora, training_args = parse_args(argv)
    trainer = build_trainer(recipe, lora, training_args)
    train_and_save(trainer, training_args)  # the adapter alone under LoRA
    if lora.merge and trainer.is_world_process_zero():
        merged = os.path.join(training_args.output_dir, "merged")
        save_merged(trainer.model, trainer.processing_class, merged)
        recipe_model_card(trainer, "merged", merged, adapter=False).save(os.path.join(merged, "README.md"))
    trainer.end()
    return trainer


if __name__ == "__main__":
    main()
