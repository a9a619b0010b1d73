"""Phase 1, alignment: train the projector and the Vision Remember blocks; vision tower and decoder stay frozen.

The paper's settings are the defaults: learning rate 1e-3, global batch 256, cosine schedule, one epoch, usually on
image-caption pairs, loss on the answers only. `trl.SFTTrainer` trains, with one optimizer group per trained part
(`vr_hf.training`); every `SFTConfig` flag works and overrides these defaults.
"""

from vr_hf.recipes import (
    RecipeTrainer,
    groups_summary,
    parse_recipe_args,
    recipe_data,
    recipe_model,
    recipe_parser,
    train_and_save,
)
from vr_hf.training import parts_optimizer, trainable_parameter_groups


EXAMPLES = """examples:
  # LLaVA-style JSON (LLaVA-Pretrain's blip_laion_cc_sbu_558k.json, say), a model built by conversion/build_llava_vr.py
  python examples/train_alignment.py --model llava-vr-init --data blip_558k.json --image_folder images \\
      --output_dir llava-vr-aligned

  # a dataset with `images` and `messages` columns, saved with save_to_disk, on 8 GPUs, logged to TensorBoard
  accelerate launch --config_file examples/accelerate/ddp.yaml examples/train_alignment.py \\
      --model llava-vr-init --data captions_dataset --output_dir llava-vr-aligned \\
      --per_device_train_batch_size 32 --report_to tensorboard

  # a tiny random model, to check the setup on a CPU in seconds
  python examples/train_alignment.py --tiny --data rows.json --output_dir /tmp/aligned --max_steps 2 \\
      --global_batch_size 2 --per_device_train_batch_size 2
"""


def parse_args(argv=None):
    parser = recipe_parser(
        __doc__, EXAMPLES, learning_rate=1e-3, global_batch_size=256, per_device_train_batch_size=16
    )
    return parse_recipe_args(parser, argv)


def build_trainer(recipe, training_args) -> RecipeTrainer:
    train_dataset, eval_dataset = recipe_data(recipe, training_args)
    model, processor = recipe_model(recipe, training_args.seed)
    rates = recipe.learning_rates("alignment", training_args.learning_rate)
    groups = trainable_parameter_groups(model, rates)  # freezes the rest before the Trainer wraps the model
    trained = groups_summary(groups)
    print(f"training {trained}")

    return RecipeTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processor,
        optimizer_cls_and_kwargs=parts_optimizer(rates),
        recipe=recipe,
        summary=f"Phase 1 (alignment): trained {trained}; everything else frozen.",
    )


def main(argv=None) -> RecipeTrainer:
    recipe, training_args = parse_args(argv)
    trainer = build_trainer(recipe, training_args)
    train_and_save(trainer, training_args)
    trainer.end()
    return trainer


if __name__ == "__main__":
    main()
