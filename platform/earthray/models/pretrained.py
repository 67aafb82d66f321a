"""Initial weights from local safetensors files: timm state dicts mapped onto earthray's modules.

Hub downloads are not assumed (clusters are often offline): a recipe that starts from
pretrained weights names a local file holding a timm model's ``state_dict()`` saved with
``safetensors.torch.save_file``. Every load is strict: each tensor the target needs must
be in the file with the target's shape, and each tensor in the file must land somewhere
(a classifier head excepted), or a :class:`WeightsError` names the file and the first key
that does not fit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from earthray.errors import EarthrayError

HEAD_PREFIX = "head."
# Derived from the model's own geometry; older timm versions kept them in the state dict.
_DERIVED = ("relative_position_index", "relative_coords_table", "attn_mask")


class WeightsError(EarthrayError, ValueError):
    """A weights file that cannot initialise the module it is meant for."""


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors file at ``path`` (on the CPU)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{path}: not a safetensors file ({e})") from None


def load_strict(module: nn.Module, tensors: Mapping[str, torch.Tensor], path: str | Path,
                skip: Iterable[str] = (), file_key: Callable[[str], str] = str, what: str | None = None) -> None:
    """Copy ``tensors`` into ``module``'s state-dict entries (parameters and buffers alike), in place.

    Entries named in ``skip`` keep their values. ``file_key`` maps a key of ``module`` to the
    file's name for it, so an error names the key the user can find in the file; ``what``
    names the module in errors (default: its class).
    """
    skip = set(skip)
    target = module.state_dict(keep_vars=True)
    what = what or type(module).__name__
    for key, value in target.items():
        if key in skip:
            continue
        if key not in tensors:
            raise WeightsError(f"{path}: lacks {file_key(key)!r} (the first tensor missing; {what} key {key!r})")
        if tuple(tensors[key].shape) != tuple(value.shape):
            raise WeightsError(f"{path}: {file_key(key)!r} has shape {tuple(tensors[key].shape)}, but {what} "
                               f"key {key!r} needs {tuple(value.shape)}")
    unused = [k for k in tensors if k not in target]
    if unused:
        raise WeightsError(f"{path}: {file_key(unused[0])!r} has no place in {what} ({len(unused)} tensor(s) of "
                           f"the file have none: a different architecture?)")
    with torch.no_grad():
        for key, value in target.items():
            if key not in skip:
                value.copy_(tensors[key])


def adapt_patch_kernel(weight: torch.Tensor, bands: int) -> torch.Tensor:
    """A patch-embedding kernel (D, I, p, p) for ``bands`` input channels instead of I.

    Unchanged when ``bands == I``. Otherwise every band gets the kernel summed over the I
    input channels, divided by ``bands``: the mean over the file's (e.g. RGB) channels,
    repeated to the sensor's bands and scaled by I / bands, so an image equally bright in
    every band gives the response the original kernel gives an equally bright RGB image.
    """
    if weight.shape[1] == bands:
        return weight
    return (weight.sum(dim=1, keepdim=True) / bands).repeat(1, bands, 1, 1)


def _swinv2_key(file_key: str) -> str:
    """timm SwinV2 key -> key of ``ModuleDict(embed=SensorPatchEmbed, encoder=SwinEncoder)``."""
    if file_key.startswith("patch_embed."):
        return "embed." + file_key[len("patch_embed."):]
    if file_key.startswith("layers."):
        return "encoder.stages." + file_key[len("layers."):]
    return "encoder." + file_key


def _swinv2_file_key(key: str) -> str:
    """The inverse of ``_swinv2_key``."""
    if key.startswith("embed."):
        return "patch_embed." + key[len("embed."):]
    if key.startswith("encoder.stages."):
        return "layers." + key[len("encoder.stages."):]
    return key[len("encoder."):] if key.startswith("encoder.") else key


def load_timm_swinv2(path: str | Path, branch: nn.Module) -> None:
    """Initialise ``branch`` (children ``embed``: a ``SensorPatchEmbed``, ``encoder``: a SwinV2
    ``SwinEncoder``, or a frozen copy of such a pair) from a local timm SwinV2 file.

    The file is a timm SwinV2's ``state_dict()`` (``timm.create_model("swinv2_...")``), in
    timm's own layout (downsampling at the start of a stage), not the original Microsoft
    checkpoints or the ``swinv2_cr_*`` family. Mapping: ``patch_embed.*`` -> ``embed.*``,
    ``layers.{i}.*`` -> ``encoder.stages.{i}.*``, ``norm.*`` -> ``encoder.norm.*``.

    Loaded: the patch embedding's conv (its kernel adapted to the embedding's bands by
    :func:`adapt_patch_kernel` when the count differs) and LayerNorm, every stage's patch
    merging and blocks (attention with its continuous position-bias MLP, logit scales and
    q/v biases, MLPs, post-norms), and the final norm. Not loaded: the SimMIM
    ``mask_token`` (timm has none; it keeps its initial value), the file's classifier
    (``head.*``) and geometry-derived tables. Image and window size may differ from the
    file's (SwinV2's position bias is a function of relative coordinates, not a table of
    the window's size); depths, widths, head counts and the patch size must match, or a
    :class:`WeightsError` names the first key that does not.
    """
    embed, encoder = branch.get_submodule("embed"), branch.get_submodule("encoder")
    if not getattr(encoder, "v2", False):
        raise WeightsError(f"{path}: a SwinV2 file cannot initialise a Swin v1 encoder")
    tensors = {}
    for key, value in read_weights(path).items():
        if key.startswith(HEAD_PREFIX) or key.rsplit(".", 1)[-1] in _DERIVED:
            continue
        if key == "patch_embed.proj.weight":
            value = adapt_patch_kernel(value, embed.in_chans)
        tensors[_swinv2_key(key)] = value
    load_strict(branch, tensors, path, skip=["encoder.mask_token"], file_key=_swinv2_file_key,
                what="the SwinV2 branch (embed + encoder)")
