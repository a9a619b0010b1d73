"""Phase 1, alignment: train the projector and the Vision Remember blocks; vision tower and decoder stay frozen.

The paper's settings are the defaults: learning rate 1e-3, global batch 256, cosine schedule, one epoch, usually on
image-caption pairs. `trl.SFTTrainer` trains; the optimizer has one group per trained part (`vr_hf.training`).
"""

from trl import SFTTrainer

from vr_hf.training import (
    PHASE_1,
    batch_summary,
    parts_optimizer,
    recipe_config,
    recipe_model_and_data,
    recipe_parser,
    trainable_parameter_groups,
)


EXAMPLES = """examples:
  # LLaVA-style JSON (LLaVA-Pretrain's blip_laion_cc_sbu_558k.json, say), a model built by conversion/build_llava_vr.py
  python examples/train_alignment.py --model llava-vr-init --data blip_558k.json --image-folder images \\
      --output-dir llava-vr-aligned

  # a dataset with `images` and `messages` columns, saved with save_to_disk, on 8 GPUs
  accelerate launch --config_file examples/accelerate/ddp.yaml examples/train_alignment.py \\
      --model llava-vr-init --data captions_dataset --output-dir llava-vr-aligned --per-device-batch-size 32

  # a tiny random model, to check the setup on a CPU in seconds
  python examples/train_alignment.py --tiny --data rows.json --output-dir /tmp/aligned --max-steps 2 \\
      --batch-size 2 --per-device-batch-size 2 --precision fp32
"""


def parse_args(argv=None):
    parser = recipe_parser(__doc__, EXAMPLES, learning_rate=1e-3, batch_size=256, per_device_batch_size=16)
    parser.add_argument(
        "--part-learning-rate",
        action="append",
        default=[],
        metavar="PART=LR",
        help=f"Train a part at its own rate, e.g. vision_remember=2e-3 (parts: {', '.join(PHASE_1)}, vision_tower, "
        "language_model, lm_head). Repeat for several.",
    )
    return parser.parse_args(argv)


def learning_rates(args) -> dict[str, float]:
    rates = dict.fromkeys(PHASE_1, args.learning_rate)
    for setting in args.part_learning_rate:
        part, _, rate = setting.partition("=")
        rates[part] = float(rate)
    return rates


def build_trainer(args) -> SFTTrainer:
    model, processor, dataset = recipe_model_and_data(args)
    rates = learning_rates(args)
    groups = trainable_parameter_groups(model, rates)  # freezes the rest before the Trainer wraps the model
    print(
        "training " + ", ".join(f"{g['name']} ({sum(p.numel() for p in g['params']):,} at {g['lr']})" for g in groups)
    )

    return SFTTrainer(
        model=model,
        args=recipe_config(args, assistant_only_loss=True),
        train_dataset=dataset,
        processing_class=processor,
        optimizer_cls_and_kwargs=parts_optimizer(rates),
    )


def main(argv=None) -> SFTTrainer:
    args = parse_args(argv)
    trainer = build_trainer(args)
    if trainer.is_world_process_zero():
        print(batch_summary(trainer.args))
    trainer.train(resume_from_checkpoint=args.resume)
    trainer.save_model(args.output_dir)
    if trainer.is_world_process_zero():
        trainer.processing_class.save_pretrained(args.output_dir)
    return trainer


if __name__ == "__main__":
    main()
