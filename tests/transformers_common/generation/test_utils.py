"""Stand-in: Transformers' source distribution does not ship `tests/generation/test_utils.py`. The generation paths
its `GenerationTesterMixin` covers are tested, against their plain references, in `tests/test_contract.py`,
`tests/test_model.py` and `tests/test_graft.py`."""


class GenerationTesterMixin:
    pass
