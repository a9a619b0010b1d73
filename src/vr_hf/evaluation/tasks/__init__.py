"""lmms-eval tasks on data that ships inside packages, no Hub: the YAML files beside this module.

- `vr_hf_red_letter`, `vr_hf_red_marker`: the main job's held-out questions (`vr_hf.demo`: the same seed and size
  as its held-out split), "Which letter is red?" and "Which marker is red?", answered by generation and scored by
  lmms-eval's `exact_match`.
- `vr_hf_red_letter_choice`, `vr_hf_red_marker_choice`: the same questions as multiple choice over the 10 letters or
  7 markers, scored by log-likelihood (lmms-eval's `multiple_choice` and its `acc`).
- `vr_hf_easy_vqa`: easy-VQA's test split (1,000 images of shapes, 9,673 questions), from the `easy-vqa` package.

The group `vr_hf_offline` runs them all. lmms-eval finds them with `--include_path` set to this folder
(`vr_hf.evaluation.TASKS_DIR`).
"""

from datasets import Dataset, DatasetDict, Features, Sequence, Value
from datasets import Image as ImageFeature
from lmms_eval.api.task import ConfigurableTask
from PIL import Image

from ...demo.compare import TEST_SEED
from ...demo.settings import Settings
from ...demo.tasks import LETTERS, MARKERS, make_split


class PackagedTask(ConfigurableTask):
    """A task whose test split is built by a function instead of downloaded from the Hub.

    `dataset_kwargs.docs` names the function; the other `dataset_kwargs` are its arguments. (lmms-eval's own tasks
    on data it does not fetch subclass `ConfigurableTask` the same way.)
    """

    def __init__(self, *args, config: dict | None = None, **kwargs):
        config = {key: value for key, value in (config or {}).items() if key != "class"}
        super().__init__(*args, config=config, **kwargs)

    def download(self, dataset_kwargs: dict | None = None) -> None:
        arguments = dict(dataset_kwargs)
        split = arguments.pop("docs")(**arguments)
        images = [name for name, feature in split.features.items() if isinstance(feature, ImageFeature)]
        self.dataset = DatasetDict({self.config.test_split: split})
        self.dataset_no_image = DatasetDict({self.config.test_split: split.remove_columns(images)})


def red_item_docs(kind: str) -> Dataset:
    """The main job's held-out questions of one kind, `"text"` (letters) or `"chart"` (markers)."""
    samples = [sample for sample in make_split(Settings().test_size, seed=TEST_SEED) if sample.task == kind]
    choices = list(LETTERS) if kind == "text" else list(MARKERS)
    features = Features(
        image=ImageFeature(), question=Value("string"), answer=Value("string"), choices=Sequence(Value("string"))
    )
    columns = {
        "image": [Image.fromarray(sample.image) for sample in samples],
        "question": [sample.question for sample in samples],
        "answer": [sample.answer for sample in samples],
        "choices": [choices] * len(samples),
    }
    return Dataset.from_dict(columns, features=features)


def easy_vqa_docs() -> Dataset:
    """easy-VQA's test questions, each with the path of its image inside the `easy-vqa` package."""
    try:
        import easy_vqa
    except ImportError as error:
        raise ImportError("vr_hf_easy_vqa reads the easy-vqa package: pip install 'vr-hf[eval]'") from error
    questions, answers, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    features = Features(image=ImageFeature(), question=Value("string"), answer=Value("string"))
    columns = {"image": [paths[image_id] for image_id in image_ids], "question": questions, "answer": answers}
    return Dataset.from_dict(columns, features=features)


def doc_to_visual(doc: dict) -> list[Image.Image]:
    return [doc["image"].convert("RGB")]
