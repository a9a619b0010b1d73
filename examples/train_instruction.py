"""Phase 2, instruction tuning: the decoder trains with the projector and Vision Remember; the vision tower is frozen.

The paper's settings are the defaults: learning rate 2e-4, global batch 32, cosine schedule, one epoch, loss on the
assistant's answers only. `trl.SFTTrainer` trains. With `--lora`, the decoder trains through LoRA adapters on its
projections while the projector and Vision Remember train in full (`vr_hf.lora`); `--qlora` adds a 4-bit decoder
(CUDA and bitsandbytes).
"""

import os

from trl import SFTTrainer

from vr_hf.lora import lora_config, qlora_quantization_config, save_merged
from vr_hf.training import (
    PHASE_2,
    batch_summary,
    parts_optimizer,
    recipe_config,
    recipe_model_and_data,
    recipe_parser,
    trainable_parameter_groups,
)


EXAMPLES = """examples:
  # the phase-1 checkpoint on LLaVA-style JSON (LLaVA-NeXT's instruction data, say)
  python examples/train_instruction.py --model llava-vr-aligned --data llava_next_779k.json \\
      --image-folder images --output-dir llava-vr-instruct

  # LoRA (rank 64) on 2 GPUs, merged back into a remote-code checkpoint in llava-vr-lora/merged
  accelerate launch --config_file examples/accelerate/ddp.yaml --num_processes 2 examples/train_instruction.py \\
      --model llava-vr-aligned --data llava_next_779k.json --image-folder images --output-dir llava-vr-lora \\
      --lora --lora-rank 64 --merge

  # resume the latest checkpoint in the output folder
  python examples/train_instruction.py --model llava-vr-aligned --data rows.json --output-dir llava-vr-instruct \\
      --resume

  # a tiny random model, to check the setup on a CPU in seconds
  python examples/train_instruction.py --tiny --data rows.json --output-dir /tmp/instruct --max-steps 2 \\
      --batch-size 2 --per-device-batch-size 2 --precision fp32
"""


def parse_args(argv=None):
    parser = recipe_parser(__doc__, EXAMPLES, learning_rate=2e-4, batch_size=32, per_device_batch_size=4)
    parser.add_argument("--lora", action="store_true", help="Train the decoder through LoRA adapters.")
    parser.add_argument("--qlora", action="store_true", help="LoRA on a 4-bit decoder (needs CUDA, bitsandbytes).")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--lora-alpha", type=int, default=None, help="Defaults to twice the rank.")
    parser.add_argument("--lora-dropout", type=float, default=0.05)
    parser.add_argument(
        "--merge", action="store_true", help="After LoRA, also save the merged model to OUTPUT_DIR/merged."
    )
    args = parser.parse_args(argv)
    if args.qlora and args.tiny:
        parser.error("--qlora quantizes a checkpoint: give it with --model.")
    if args.merge and args.qlora:
        parser.error("merge a QLoRA adapter into the full-precision model with vr_hf.lora.merge_adapter_checkpoint.")
    if args.merge and not args.lora:
        parser.error("--merge merges LoRA adapters: add --lora.")
    args.lora = args.lora or args.qlora
    return args


def build_trainer(args) -> SFTTrainer:
    quantization = {"quantization_config": qlora_quantization_config()} if args.qlora else {}
    model, processor, dataset = recipe_model_and_data(args, **quantization)
    if args.lora:  # PEFT freezes everything but the adapters and the modules it saves
        training = dict(peft_config=lora_config(args.lora_rank, args.lora_alpha, args.lora_dropout))
    else:
        rates = dict.fromkeys(PHASE_2, args.learning_rate)
        trainable_parameter_groups(model, rates)  # freezes the vision tower before the Trainer wraps the model
        training = dict(optimizer_cls_and_kwargs=parts_optimizer(rates))

    return SFTTrainer(
        model=model,
        args=recipe_config(args, assistant_only_loss=True),
        train_dataset=dataset,
        processing_class=processor,
        **training,
    )


def main(argv=None) -> SFTTrainer:
    args = parse_args(argv)
    trainer = build_trainer(args)
    if trainer.is_world_process_zero():
        print(batch_summary(trainer.args))
    trainer.train(resume_from_checkpoint=args.resume)
    trainer.save_model(args.output_dir)  # the adapter alone under LoRA
    if trainer.is_world_process_zero():
        processor = trainer.processing_class
        processor.save_pretrained(args.output_dir)
        if args.merge:
            save_merged(trainer.model, processor, os.path.join(args.output_dir, "merged"))
    return trainer


if __name__ == "__main__":
    main()
