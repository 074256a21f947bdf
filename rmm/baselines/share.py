"""SHARE (arXiv 2602.06043) through its own package, `pip install lorashare`: a third-party reversible baseline.

Per layer and side (lora_A, lora_B), PCA of the T adapters' stacked raw factors gives k shared components
(feature_dim x k) and each adapter keeps its loadings (k x r) on them; heads (`modules_to_save`) are kept apart
and put back. Used as its README says: `SHAREModel.from_adapters`, `save_pretrained`, `reconstruct`.
"""

from __future__ import annotations

from pathlib import Path

from rmm.adapter import LoraAdapter, open_adapter
from rmm.baselines import SUMMARY_FILE, register
from rmm.baselines.reversible import _check_names
from rmm.errors import RMMError
from rmm.io import tensor_counts
from rmm.metrics import relative_error
from rmm.plan import numbers_original

CHECKPOINT_DIR = "share"  # lorashare's own checkpoint, next to the reconstructed adapters


@register("share", "reversible", "SHARE (PyPI lorashare): k PCA components per layer and side shared by all tasks")
def share(adapters: list[LoraAdapter], out_dir: Path, *, components=None, storage_ratio=None) -> dict:
    """k = `components`, or the largest k whose storage (counted from lorashare's saved tensors) fits
    `storage_ratio` of the originals' numbers (default 0.5). lorashare clamps k to the smallest side."""
    try:
        from lorashare import SHAREModel
    except ImportError:
        raise RMMError("method 'share' needs SHARE's package: pip install lorashare") from None
    if components is not None and storage_ratio is not None:
        raise RMMError("give either components or storage_ratio, not both")
    if components is None and storage_ratio is None:
        storage_ratio = 0.5
    if components is not None and (isinstance(components, bool) or not isinstance(components, int) or components < 1):
        raise RMMError(f"components must be a positive integer, got {components!r}")
    ranks = {a.name: sorted({s.rank for s in a.modules.values()}) for a in adapters}
    if len({r for rs in ranks.values() for r in rs}) > 1:
        given = ", ".join(f"{t} r={'/'.join(map(str, rs))}" for t, rs in ranks.items())
        raise RMMError(f"SHARE (lorashare) needs adapters of one rank: {given}")
    _check_names(adapters, {CHECKPOINT_DIR, SUMMARY_FILE})
    checkpoint = out_dir / CHECKPOINT_DIR
    paths = {a.name: str(a.path) for a in adapters}  # named as rmm names tasks (lorashare would too, from the dirs)

    def compress(k: int):
        try:
            model = SHAREModel.from_adapters(paths, num_components=k)
        except ValueError as e:  # its compatibility checks (base model, target modules)
            raise RMMError(f"lorashare refused the adapters: {e}") from None
        model.save_pretrained(checkpoint)
        stored = tensor_counts(checkpoint / "shared_components.safetensors")[0] + sum(
            tensor_counts(checkpoint / "adapters" / t / "loadings.safetensors")[0] for t in paths
        )
        return model, stored

    if components is None:
        # Every tensor SHARE stores has k along one side, so k components cost k times what one costs.
        budget = storage_ratio * numbers_original(adapters)
        _, one = compress(1)
        components = int(budget // one)
        if components < 1:
            raise RMMError(
                f"storage_ratio {storage_ratio} is below one SHARE component ({one} numbers of {budget:.0f})"
            )
    model, stored = compress(components)

    written, errors = {}, {}
    for a in adapters:
        model.reconstruct(a.name, output_dir=out_dir / a.name)  # its own config (lora_alpha) and head kept
        rebuilt = open_adapter(out_dir / a.name)
        errs = [relative_error(*a.load_factors(m), *rebuilt.load_factors(m)).item() for m in a.modules]
        written[a.name], errors[a.name] = out_dir / a.name, sum(errs) / len(errs)
    return {"adapters": written, "numbers_stored": stored, "errors": errors}
