"""The identity files a backend reads, and the one reader that checks them.

A backend that conditions on a precomputed identity (``--face-embedding``, ``--face-keypoints``,
``--identity-embedding``) declares what the file must hold as its class attribute
``identity_schema``: an :class:`IdentitySchema`, one :class:`TensorField` per tensor (name,
shapes, number kind, whether required, value bounds). :func:`read_identity_file` reads a file
(safetensors, a tensor-only PyTorch file, or JSON) and checks it against the schema, so that a
wrong file stops the run in one line naming the tensor and what the backend expects, before any
model loads (``Backend.check_identity_files``, called by the builder before ``from_options``), instead
of a traceback inside the model or a silently wrong image.

Shapes may name **symbolic** dimensions (``"refs"``, ``"id_width"``, ``"clip_width"`` …). A
symbol given in ``dims`` must equal that number: the backend passes its model's widths — the
released model's before loading (or the tiny model's under ``--tiny``), the built model's own
afterwards. A symbol not given may take any value ≥ 1, the same in every tensor that names it
(``refs`` of PuLID's ``id_cond`` and of its hidden states).

Value bound. Every float tensor must satisfy ``|x| ≤`` :data:`MAX_ABS` (10⁴). A real embedding
never comes close: an ArcFace embedding has norm ≈ 20–30 raw (each entry well under 10) and 1
normalised; CLIP ViT-H and EVA02-CLIP hidden states, outlier channels included, stay within a
few hundred. Values such as 3·10³⁸ overflow the first linear layer or LayerNorm to infinity and
the run to NaN (an all-black image), so they are refused here. Keypoints are pixels: they must
lie inside the photo (``0 ≤ x ≤ width``, ``0 ≤ y ≤ height`` of ``image_size``, or of the
reference photo), and ``image_size`` is two integers in 1 … :data:`MAX_IMAGE_SIDE`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ...core.errors import InputError, WeightsNotFoundError

#: The largest magnitude a float in an identity file may have (see the module docstring).
MAX_ABS = 1e4
#: The largest photo side ``image_size`` may give, in pixels.
MAX_IMAGE_SIDE = 1 << 16

Dim = int | str
Shape = tuple[Dim, ...]

KINDS = {
    "float": "floating-point numbers",
    "int": "integers",
    "real": "numbers (integer or floating-point)",
}


@dataclass(frozen=True)
class TensorField:
    """One tensor of an identity file.

    Attributes:
        name: the tensor's name in the file.
        shapes: the shapes accepted (alternatives); an ``int`` is a fixed size, a ``str`` a
            symbolic dimension (see the module docstring).
        what: what the tensor is, for messages and the docs' table.
        kind: ``"float"``, ``"int"`` or ``"real"`` (either).
        required: the file must hold it.
        bound: ``|x| ≤ bound`` for every entry (None: no bound).
        minimum, maximum: every entry within these (None: unbounded).
        within: the name of a (width, height) tensor whose rectangle every (x, y) row of this one
            must lie inside (keypoints inside the photo).
    """

    name: str
    shapes: tuple[Shape, ...]
    what: str
    kind: str = "float"
    required: bool = True
    bound: float | None = MAX_ABS
    minimum: float | None = None
    maximum: float | None = None
    within: str | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown kind {self.kind!r}")
        if not self.shapes:
            raise ValueError(f"{self.name}: at least one shape")

    def shape_text(self, dims: Mapping[str, int] | None = None) -> str:
        """The accepted shapes, symbols given in ``dims`` replaced by their sizes: ``(refs, 1280)``."""
        return " or ".join(_shape_text(shape, dims or {}) for shape in self.shapes)

    def values_text(self) -> str:
        """The value constraints in words, for messages and the docs' table."""
        parts = []
        if self.kind == "float" or self.kind == "real":
            parts.append("finite")
        if self.bound is not None:
            parts.append(f"|x| ≤ {self.bound:g}")
        if self.minimum is not None and self.maximum is not None:
            parts.append(f"{self.minimum:g} … {self.maximum:g}")
        elif self.minimum is not None:
            parts.append(f"≥ {self.minimum:g}")
        elif self.maximum is not None:
            parts.append(f"≤ {self.maximum:g}")
        if self.within is not None:
            parts.append(f"inside the photo ({self.within})")
        return ", ".join(parts)


def _shape_text(shape: Shape, dims: Mapping[str, int]) -> str:
    items = [str(dims.get(d, d)) if isinstance(d, str) else str(d) for d in shape]
    return f"({items[0]},)" if len(items) == 1 else f"({', '.join(items)})"


@dataclass(frozen=True)
class IdentitySchema:
    """What one backend's identity file holds.

    Attributes:
        backend: the backend's name, for messages.
        option: the option that names the file (``--face-embedding``).
        fields: its tensors.
        doc: where the format is described, for messages.
        allow_unknown: other tensors in the file are ignored (else refused, naming them).
    """

    backend: str
    option: str
    fields: tuple[TensorField, ...]
    doc: str
    allow_unknown: bool = False

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(field.name for field in self.fields)

    def field(self, name: str) -> TensorField:
        for field in self.fields:
            if field.name == name:
                return field
        raise KeyError(name)

    def requiring(self, *names: str) -> IdentitySchema:
        """This schema with ``names`` required (IP-Adapter-FaceID Plus: the CLIP states)."""
        return replace(self, fields=tuple(replace(f, required=f.required or f.name in names) for f in self.fields))

    def only(self, *names: str, option: str | None = None) -> IdentitySchema:
        """The schema of a file holding just ``names`` (``--face-keypoints``: the keypoints)."""
        fields = tuple(replace(self.field(name), required=True) for name in names)
        return replace(self, fields=fields, option=option or self.option)

    def check(
        self,
        tensors: Mapping[str, object],
        dims: Mapping[str, int] | None = None,
        source: str | None = None,
        size: Sequence[int] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Check ``tensors`` against the schema.

        Args:
            tensors: name → tensor (as read from a file, or computed).
            dims: the sizes of symbolic dimensions that the model fixes.
            source: what to call the tensors in messages (default: the backend's file).
            size: (width, height) that keypoints must lie inside when the tensors hold no
                ``image_size`` (the reference photo's), or None.
        Returns:
            The schema's tensors that are present, by name.
        Raises:
            InputError: the first problem, naming the tensor and what the backend expects.
        """
        source = source or f"the {self.backend} {self.option} file"
        known = set(self.names)
        unknown = sorted(str(name) for name in tensors if name not in known)
        if unknown and not self.allow_unknown:
            raise InputError(
                f"{source}: unknown tensor(s) {', '.join(unknown)}; {self.backend} reads {self._listing()} "
                f"(see {self.doc})"
            )
        missing = [f.name for f in self.fields if f.required and f.name not in tensors]
        if missing:
            held = ", ".join(sorted(map(str, tensors))) or "nothing"
            raise InputError(
                f"{source} lacks {', '.join(missing)} (it holds: {held}); {self.backend} reads "
                f"{self._listing()} (see {self.doc})"
            )
        bound = dict(dims or {})
        out = {}
        for field in self.fields:
            if field.name in tensors:
                out[field.name] = self._check_field(field, tensors[field.name], bound, source)
        for field in self.fields:
            if field.within is not None and field.name in out:
                rectangle = out.get(field.within)
                rect = None if rectangle is None else (int(rectangle[0]), int(rectangle[1]))
                rect = rect or (None if size is None else (int(size[0]), int(size[1])))
                if rect is not None:
                    check_points_inside(out[field.name], rect, f"{source}: {field.name}", field.within)
        return out

    def _listing(self) -> str:
        return ", ".join(
            f"{f.name} {f.shape_text()}" + ("" if f.required else " (optional)") for f in self.fields
        )

    def _expects(self, field: TensorField, dims: Mapping[str, int]) -> str:
        return f"{self.backend} expects {field.shape_text(dims)}, {field.what}; see {self.doc}"

    def _check_field(self, field: TensorField, value, dims: dict[str, int], source: str) -> torch.Tensor:
        name = f"{source}: {field.name}"
        if not isinstance(value, torch.Tensor):
            raise InputError(f"{name} is a {type(value).__name__}, not a tensor; {self._expects(field, dims)}")
        shape = tuple(value.shape)
        matched = _match(shape, field.shapes, dims)
        if matched is None:
            free = sorted({d for s in field.shapes for d in s if isinstance(d, str) and d not in dims})
            tail = f" ({', '.join(free)} ≥ 1)" if free else ""
            raise InputError(f"{name} has shape {shape}; {self._expects(field, dims)}{tail}")
        if value.dtype == torch.bool or value.is_complex():
            raise InputError(f"{name} holds {value.dtype}; {self.backend} expects {KINDS[field.kind]}")
        if value.is_floating_point() and not torch.isfinite(value).all():
            bad = int((~torch.isfinite(value)).sum())
            raise InputError(
                f"{name} holds NaN or infinite values ({bad} of {value.numel()}); {self._expects(field, dims)}"
            )
        if field.kind == "float" and not value.is_floating_point():
            raise InputError(f"{name} holds {value.dtype}; {self.backend} expects {KINDS['float']}")
        if field.kind == "int" and value.is_floating_point():
            raise InputError(
                f"{name} holds {value.dtype}; {self.backend} expects {KINDS['int']} (e.g. int64), {field.what}"
            )
        as_double = value.double()
        if field.bound is not None and value.numel():
            largest = float(as_double.abs().max())
            if largest > field.bound:
                raise InputError(
                    f"{name} holds values up to {largest:.3g} in magnitude; {self.backend} expects "
                    f"|x| ≤ {field.bound:g} ({field.what}: a real one is far smaller); the file is not a "
                    f"valid embedding (see {self.doc})"
                )
        low = None if field.minimum is None else float(as_double.min())
        high = None if field.maximum is None else float(as_double.max())
        if (low is not None and low < field.minimum) or (high is not None and high > field.maximum):
            raise InputError(
                f"{name} is {value.tolist()}; {self.backend} expects {field.values_text()} ({field.what})"
            )
        dims.update(matched)
        return value

    def table(self, dims: Mapping[str, int] | None = None) -> str:
        """The schema as a Markdown table (docs/backends/*.md carry it; a test compares them)."""
        lines = ["| tensor | shape | numbers | required | what |", "|---|---|---|---|---|"]
        for f in self.fields:
            shape = f.shape_text(dims).replace("|", "\\|")
            values = ", ".join(filter(None, [KINDS[f.kind].split(" (")[0], f.values_text()])).replace("|", "\\|")
            required = "yes" if f.required else "no"
            lines.append(f"| `{f.name}` | {shape} | {values} | {required} | {f.what} |")
        return "\n".join(lines)


def _match(shape: tuple[int, ...], shapes: Sequence[Shape], dims: Mapping[str, int]) -> dict[str, int] | None:
    """The symbol sizes under which ``shape`` is one of ``shapes``, or None."""
    for candidate in shapes:
        if len(candidate) != len(shape):
            continue
        bound: dict[str, int] = {}
        for want, got in zip(candidate, shape):
            if isinstance(want, int):
                if want != got:
                    break
            else:
                expected = dims.get(want, bound.get(want))
                if expected is not None and expected != got:
                    break
                if got < 1:
                    break
                bound[want] = got
        else:
            return bound
    return None


def check_points_inside(points: torch.Tensor, size: tuple[int, int], name: str, size_name: str = "image_size"):
    """Refuse (x, y) rows outside [0, width] × [0, height]: drawn outside the photo they would
    leave a blank control image."""
    width, height = size
    for index, (x, y) in enumerate(points.double().tolist()):
        if not (0 <= x <= width and 0 <= y <= height):
            raise InputError(
                f"{name}: point {index} ({x:g}, {y:g}) lies outside the {width}×{height} photo; keypoints are "
                f"pixel (x, y) in the reference photo, with 0 ≤ x ≤ {width} and 0 ≤ y ≤ {height} "
                f"(the size is the file's {size_name}, else the --ref photo's)"
            )


def read_identity_file(
    path: str | os.PathLike,
    schema: IdentitySchema,
    dims: Mapping[str, int] | None = None,
    size: Sequence[int] | None = None,
) -> dict[str, torch.Tensor]:
    """Read ``path`` and check it against ``schema``: the one reader of identity files.

    ``.safetensors`` files and tensor-only PyTorch files are read with
    :func:`freecure.checkpoints.read_tensors` (nothing is unpickled); ``.json`` files hold either
    an object (tensor name → nested lists) or, for a one-tensor schema (``--face-keypoints``),
    the nested list itself.

    Raises:
        InputError: the file is missing, unreadable, or does not fit the schema.
    """
    from ...core.checkpoints import read_tensors

    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"{schema.option} {path} not found: it does not exist or is not a file")
    if path.suffix.lower() == ".json":
        tensors = _read_json(path, schema)
    else:
        try:
            tensors = read_tensors(path, f"the {schema.option} file of {schema.backend}")
        except WeightsNotFoundError as error:
            raise InputError(str(error)) from None
    return schema.check(tensors, dims, source=f"{schema.option} {path}", size=size)


def _read_json(path: Path, schema: IdentitySchema) -> dict:
    expected = (
        f"a JSON list {schema.fields[0].shape_text()}" if len(schema.fields) == 1 else "a JSON object of named lists"
    )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise InputError(f"{schema.option} {path}: expected {expected} ({error})") from None
    if isinstance(data, list) and len(schema.fields) == 1:
        data = {schema.fields[0].name: data}
    if not isinstance(data, dict):
        raise InputError(f"{schema.option} {path}: expected {expected}, got a JSON {type(data).__name__}")
    tensors = {}
    for name, value in data.items():
        if not _numbers(value):
            raise InputError(f"{schema.option} {path}: {name} must be (nested lists of) numbers; expected {expected}")
        try:
            tensors[name] = torch.tensor(value, dtype=torch.float64 if _has_float(value) else None)
        except (TypeError, ValueError, RuntimeError, OverflowError) as error:
            raise InputError(f"{schema.option} {path}: {name} is not a regular array of numbers ({error})") from None
    return tensors


def _numbers(value) -> bool:
    if isinstance(value, list):
        return all(_numbers(v) for v in value)
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _has_float(value) -> bool:
    if isinstance(value, list):
        return any(_has_float(v) for v in value)
    return isinstance(value, float)


def reference_size(args) -> tuple[int, int] | None:
    """(width, height) of the first ``--ref`` photo, read from its header only; None when there
    is none or it cannot be read (its own check reports that)."""
    refs = getattr(args, "ref", None) or []
    if not refs:
        return None
    try:
        from PIL import Image

        with Image.open(refs[0]) as image:
            return image.size
    except Exception:  # noqa: BLE001 - the reference's own loader says what is wrong
        return None


__all__ = [
    "MAX_ABS",
    "MAX_IMAGE_SIDE",
    "IdentitySchema",
    "TensorField",
    "check_points_inside",
    "read_identity_file",
    "reference_size",
]
