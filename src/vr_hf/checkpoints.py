"""Checkpoints a user names or a conversion writes: where a named one comes from, loading its parts with errors that
say what failed, and writing a new one so that a failure leaves nothing behind."""

import os
import shutil
import tempfile


class ConversionError(ValueError):
    """A conversion that cannot be done as asked; the message says why and what to do."""


def resolve_source(name, role: str, hub_needs_owner: bool = False) -> str:
    """A local folder (which must exist) or a Hub id (left to `from_pretrained`). A name that looks like a path (or,
    with `hub_needs_owner`, that is not `owner/name`) and is no folder is refused here, before the Hub is asked and
    answers with an error that names neither."""
    name = os.fspath(name)
    expanded = os.path.expanduser(name)
    if os.path.isdir(expanded):
        return expanded
    owner = name.partition("/")[0]
    looks_local = (
        os.path.isabs(expanded)
        or name.startswith((".", "~"))
        or name.count("/") > 1
        or os.path.exists(expanded)
        or ("/" in name and os.path.isdir(owner))  # a folder here, not a Hub owner
        or (hub_needs_owner and "/" not in name)
    )
    if looks_local:
        raise FileNotFoundError(
            f"{role} {name!r}: no such folder. Give a folder with a Transformers checkpoint (config.json and weights) "
            "or a Hub id such as 'google/siglip-so400m-patch14-384'."
        )
    return name


def load_part(loader, source: str, role: str, **kwargs):
    """`loader(source, **kwargs)`, its failure a `ConversionError` that names `role` and `source`."""
    try:
        return loader(source, **kwargs)
    except (OSError, ValueError, KeyError) as error:
        raise ConversionError(f"Could not load the {role} from {source!r}: {error}") from error


def check_output_dir(output_dir: str, overwrite: bool) -> str:
    """`output_dir`, absolute; refused where it is a file, or a folder with contents that `overwrite` does not allow
    to replace."""
    output_dir = os.path.abspath(os.path.expanduser(os.fspath(output_dir)))
    if os.path.exists(output_dir):
        if not os.path.isdir(output_dir):
            raise FileExistsError(f"output_dir {output_dir!r} is a file: give a folder path.")
        if os.listdir(output_dir) and not overwrite:
            raise FileExistsError(
                f"output_dir {output_dir!r} exists and is not empty: choose another folder, or pass overwrite=True "
                "(--overwrite) to replace it."
            )
    return output_dir


def write_checkpoint(output_dir: str, model, processor, files: dict[str, str]):
    """Save `model`, `processor` and `files` (name: text) into a temporary sibling of `output_dir`, renamed to it at
    the end."""
    parent, name = os.path.split(output_dir)
    os.makedirs(parent, exist_ok=True)
    partial = tempfile.mkdtemp(prefix=f".{name}.partial-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(partial, 0o777 & ~umask)  # mkdtemp's folder is private; the checkpoint should not be
    old = None
    try:
        model.save_pretrained(partial)
        processor.save_pretrained(partial)
        for filename, text in files.items():
            with open(os.path.join(partial, filename), "w") as file:
                file.write(text)
        if os.path.exists(output_dir):
            old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
            os.rmdir(old)
            os.replace(output_dir, old)
        os.replace(partial, output_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        if old is not None and not os.path.exists(output_dir):
            os.replace(old, output_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


__all__ = ["ConversionError", "check_output_dir", "load_part", "resolve_source", "write_checkpoint"]
