"""What a `vr-hf` run is asked to do; light, so that `vr-hf --help` starts at once."""

from dataclasses import dataclass, field


DECODERS = ("tiny", "smollm2")


@dataclass
class Settings:
    tables: list[str] = field(default_factory=lambda: ["main"])
    task: str = "red"  # the task family (`tasks.FAMILIES`)
    ratios: list[int] = field(default_factory=lambda: [3])  # downsample factors s of the main table: ratio 1/s**2
    seeds: list[int] = field(default_factory=lambda: [0])
    steps: int = 2500
    learning_rate: float = 1e-3
    sweep: list[float] = field(default_factory=list)  # learning rates every model is tuned over (`tuning`)
    batch_size: int = 32
    train_size: int = 4000
    test_size: int = 400
    tower_steps: int = 400
    warm_start_steps: int = 0  # per seed, steps of the uncompressed model every compared model starts from
    workers: int = 2
    decoder: str = "tiny"
    output_dir: str = "outputs/vr-hf"
