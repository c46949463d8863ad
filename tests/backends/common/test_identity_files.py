"""Identity files (``--face-embedding``, ``--face-keypoints``, ``--identity-embedding``): one schema
per backend, one reader, and every bad file refused in one line before any model loads.

The CLI cases are the ones issue 20 lists: before the schema each ended in a traceback inside
the model, or in exit 0 with a black image / a blank control image. Checked before any model
loads, they now take milliseconds.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from freecure.backends import BACKENDS
from freecure.backends.common.face_embedding import FaceEmbedding, load_face_embedding, save_face_embedding
from freecure.backends.common.identity_files import MAX_ABS, IdentitySchema, TensorField, read_identity_file
from freecure.backends.pulid.embedding import RELEASED_DIMS, PuLIDFaceEmbedding
from freecure.cli import main
from freecure.core.errors import InputError

PROMPT = "a man with black curly hair, laughing happily"
DOCS = Path(__file__).resolve().parents[3] / "docs" / "backends"

# ---------------------------------------------------------------------------------------- files


def _face(tmp_path: Path, name: str = "face.safetensors", **tensors) -> str:
    tensors.setdefault("id_embedding", torch.linspace(-1, 1, 512))
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in tensors.items() if v is not None}, str(path))
    return str(path)


def _keypoints(tmp_path: Path, points) -> str:
    path = tmp_path / "kps.json"
    path.write_text(json.dumps(points))
    return str(path)


def _pulid(tmp_path: Path, refs: int = 1, id_dim: int = 24, vit_dim: int = 16, patches: int = 9, fill=None) -> str:
    g = torch.Generator().manual_seed(0)
    tensors = {"id_cond": torch.randn(refs, id_dim, generator=g) if fill is None else torch.full((refs, id_dim), fill)}
    tensors.update({f"vit_hidden.{i}": torch.randn(refs, patches, vit_dim, generator=g) for i in range(5)})
    path = tmp_path / "pulid.safetensors"
    save_file(tensors, str(path))
    return str(path)


def _infiniteyou(tmp_path: Path, embedding: torch.Tensor) -> str:
    path = tmp_path / "arcface.safetensors"
    save_file({"embedding": embedding}, str(path))
    return str(path)


KPS = [[20, 24], [44, 24], [32, 34], [24, 46], [40, 46]]  # inside a 64 × 64 photo
HUGE = torch.full((512,), 3e38)

# backend → the options that select a tiny model of its family
TINY = {
    "ip-adapter-faceid": ["--tiny-family", "sd15"],
    "instantid": ["--tiny-family", "sdxl"],
    "infiniteyou": ["--tiny-family", "flux"],
    "pulid-sdxl": ["--tiny-family", "sdxl"],
    "pulid-flux": ["--tiny-family", "flux"],
    "token-fusion": ["--tiny-family", "sd15"],
}

# (case id, backend, options (files made in tmp_path), what the one-line error must say)
CASES = [
    ("faceid-100-long", "ip-adapter-faceid",
     lambda t: ["--face-embedding", _face(t, id_embedding=torch.ones(100))],
     ["id_embedding has shape (100,)", "(512,) or (1, 512)"]),
    ("faceid-empty", "ip-adapter-faceid",
     lambda t: ["--face-embedding", _face(t, id_embedding=torch.ones(0))],
     ["id_embedding has shape (0,)", "(512,) or (1, 512)"]),
    ("faceid-2x512", "ip-adapter-faceid",
     lambda t: ["--face-embedding", _face(t, id_embedding=torch.ones(2, 512))],
     ["id_embedding has shape (2, 512)"]),
    ("faceid-3e38", "ip-adapter-faceid",
     lambda t: ["--face-embedding", _face(t, id_embedding=HUGE)],
     ["id_embedding holds values up to 3e+38", f"|x| ≤ {MAX_ABS:g}"]),
    ("faceid-plus-clip-width", "ip-adapter-faceid",
     lambda t: ["--faceid-variant", "plus", "--tiny-family", "sdxl", "--face-embedding",
                _face(t, clip_embedding=torch.ones(5, 31), negative_clip_embedding=torch.zeros(5, 31))],
     ["clip_embedding has shape (5, 31)", "(clip_tokens, 32)"]),
    ("faceid-plus-without-clip", "ip-adapter-faceid",
     lambda t: ["--faceid-variant", "plus", "--tiny-family", "sdxl", "--face-embedding", _face(t)],
     ["lacks clip_embedding, negative_clip_embedding"]),
    ("instantid-image-size-one-value", "instantid",
     lambda t: ["--face-embedding", _face(t, keypoints=torch.tensor(KPS, dtype=torch.float32),
                                          image_size=torch.tensor([64]))],
     ["image_size has shape (1,)", "(2,)"]),
    ("instantid-image-size-nan", "instantid",
     lambda t: ["--face-embedding", _face(t, keypoints=torch.tensor(KPS, dtype=torch.float32),
                                          image_size=torch.tensor([float("nan"), 64.0]))],
     ["image_size holds NaN"]),
    ("instantid-image-size-zero", "instantid",
     lambda t: ["--face-embedding", _face(t, keypoints=torch.tensor(KPS, dtype=torch.float32),
                                          image_size=torch.tensor([0, 0]))],
     ["image_size is [0, 0]", "1 … 65536"]),
    ("instantid-keypoints-1e30-in-file", "instantid",
     lambda t: ["--face-embedding", _face(t, keypoints=torch.full((5, 2), 1e30), image_size=torch.tensor([64, 64]))],
     ["keypoints holds values up to 1e+30"]),
    ("instantid-keypoints-1e30-json", "instantid",
     lambda t: ["--face-embedding", _face(t), "--face-keypoints", _keypoints(t, [[1e30, 1e30]] * 5)],
     ["--face-keypoints", "keypoints holds values up to 1e+30"]),
    ("instantid-keypoints-outside-the-photo", "instantid",
     lambda t: ["--face-embedding", _face(t), "--face-keypoints", _keypoints(t, [[x + 200, y] for x, y in KPS])],
     ["point 0 (220, 24) lies outside the 64×64 photo"]),
    ("instantid-file-keypoints-outside-image-size", "instantid",
     lambda t: ["--face-embedding", _face(t, keypoints=torch.tensor(KPS, dtype=torch.float32) * 10,
                                          image_size=torch.tensor([64, 64]))],
     ["keypoints: point 0 (200, 240) lies outside the 64×64 photo"]),
    ("instantid-3e38", "instantid",
     lambda t: ["--face-embedding", _face(t, id_embedding=HUGE), "--face-keypoints", _keypoints(t, KPS)],
     ["id_embedding holds values up to 3e+38"]),
    ("infiniteyou-3e38", "infiniteyou",
     lambda t: ["--face-embedding", _infiniteyou(t, HUGE)],
     ["embedding holds values up to 3e+38"]),
    ("infiniteyou-2x512", "infiniteyou",
     lambda t: ["--face-embedding", _infiniteyou(t, torch.ones(2, 512))],
     ["embedding has shape (2, 512)", "(512,) or (1, 512)"]),
    ("pulid-id-cond-0x24", "pulid-sdxl",
     lambda t: ["--face-embedding", _pulid(t, refs=0)],
     ["id_cond has shape (0, 24)", "(refs, 24)", "refs ≥ 1"]),
    ("pulid-flux-3e38", "pulid-flux",
     lambda t: ["--face-embedding", _pulid(t, fill=3e38)],
     ["id_cond holds values up to 3e+38"]),
]


@pytest.mark.parametrize("backend, options, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_identity_files_fail_in_one_line_before_any_model_loads(
    tmp_path, capsys, monkeypatch, backend, options, expected
):
    Image.new("RGB", (64, 64), (120, 90, 60)).save(tmp_path / "ref.png")
    built = []
    original = BACKENDS[backend].from_options.__func__
    monkeypatch.setattr(
        BACKENDS[backend], "from_options", classmethod(lambda cls, args: built.append(1) or original(cls, args))
    )
    argv = ["generate", "--tiny", *TINY[backend], "--backend", backend, "--prompt", PROMPT]
    argv += ["--ref", str(tmp_path / "ref.png"), "--steps", "2", "--out", str(tmp_path / "out"), "--no-progress"]
    assert main([*argv, *options(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("freecure generate: error: "), err
    for text in expected:
        assert text in err, (text, err)
    assert not built, "the backend was built before the file was checked"
    assert not (tmp_path / "out").exists()


def test_good_files_pass_the_checks_of_every_backend(tmp_path):
    """The formats the backends and `freecure embed` write pass their own schema."""
    from argparse import Namespace

    ref = tmp_path / "ref.png"
    Image.new("RGB", (64, 64)).save(ref)
    face = _face(tmp_path, keypoints=torch.tensor(KPS, dtype=torch.float32), image_size=torch.tensor([64, 64]))
    plus = _face(
        tmp_path, "plus.safetensors", clip_embedding=torch.ones(5, 32), negative_clip_embedding=torch.zeros(5, 32)
    )
    real_plus = _face(tmp_path, "real.safetensors", id_embedding=torch.ones(1, 512),
                      clip_embedding=torch.ones(257, 1280), negative_clip_embedding=torch.zeros(257, 1280))
    args = dict(tiny=True, ref=[ref], face_keypoints=None)
    BACKENDS["instantid"].check_identity_files(Namespace(**args, face_embedding=face))
    BACKENDS["ip-adapter-faceid"].check_identity_files(Namespace(**args, face_embedding=plus, faceid_variant="plus"))
    BACKENDS["ip-adapter-faceid"].check_identity_files(
        Namespace(**{**args, "tiny": False}, face_embedding=real_plus, faceid_variant="plusv2")
    )
    wrong = r"clip_embedding has shape \(5, 32\); ip-adapter-faceid expects \(257, 1280\)"
    with pytest.raises(InputError, match=wrong):
        BACKENDS["ip-adapter-faceid"].check_identity_files(
            Namespace(**{**args, "tiny": False}, face_embedding=plus, faceid_variant="plus")
        )
    BACKENDS["pulid-sdxl"].check_identity_files(Namespace(tiny=True, face_embedding=_pulid(tmp_path, refs=3)))
    with pytest.raises(InputError, match=r"id_cond has shape \(3, 24\); pulid-flux expects \(1, 24\)"):
        BACKENDS["pulid-flux"].check_identity_files(Namespace(tiny=True, face_embedding=_pulid(tmp_path, refs=3)))
    with pytest.raises(InputError, match=r"vit_hidden.0 has shape \(1, 9, 16\); pulid-sdxl expects \(1, 577, 1024\)"):
        BACKENDS["pulid-sdxl"].check_identity_files(
            Namespace(tiny=False, face_embedding=_pulid(tmp_path, id_dim=1280, vit_dim=16))
        )
    BACKENDS["infiniteyou"].check_identity_files(Namespace(face_embedding=_infiniteyou(tmp_path, torch.ones(1, 512))))


def test_instantid_needs_keypoints_from_one_of_the_files_before_loading(tmp_path, capsys):
    Image.new("RGB", (64, 64)).save(tmp_path / "ref.png")
    argv = ["generate", "--tiny", "--tiny-family", "sdxl", "--backend", "instantid", "--prompt", PROMPT, "--ref",
            str(tmp_path / "ref.png"), "--out", str(tmp_path / "out"), "--face-embedding", _face(tmp_path)]
    assert main(argv) == 2
    assert "holds no keypoints and InstantID needs the face's 5" in capsys.readouterr().err


# ------------------------------------------------------------------------------- the schema


SCHEMA = IdentitySchema(
    "demo",
    "--face-embedding",
    (
        TensorField("a", (("refs", "width"),), "rows"),
        TensorField("b", (("refs", 3),), "more rows", required=False),
        TensorField("size", ((2,),), "a size", kind="int", bound=None, minimum=1, maximum=100, required=False),
        TensorField("points", ((2, 2),), "points", kind="real", bound=1000, within="size", required=False),
    ),
    "docs/demo.md",
)


def test_symbolic_dimensions_bind_once_and_fixed_ones_come_from_the_model():
    SCHEMA.check({"a": torch.ones(2, 5), "b": torch.ones(2, 3)})
    SCHEMA.check({"a": torch.ones(2, 5)}, {"width": 5})
    with pytest.raises(InputError, match=r"b has shape \(4, 3\); demo expects \(2, 3\)"):
        SCHEMA.check({"a": torch.ones(2, 5), "b": torch.ones(4, 3)})
    with pytest.raises(InputError, match=r"a has shape \(2, 5\); demo expects \(refs, 7\), rows; see docs/demo.md"):
        SCHEMA.check({"a": torch.ones(2, 5)}, {"width": 7})


def test_names_kinds_ranges_and_points():
    with pytest.raises(InputError, match="lacks a .*it holds: b"):
        SCHEMA.check({"b": torch.ones(1, 3)})
    with pytest.raises(InputError, match="unknown tensor.*typo; demo reads a \\(refs, width\\)"):
        SCHEMA.check({"a": torch.ones(1, 1), "typo": torch.ones(1)})
    with pytest.raises(InputError, match="size holds torch.float32; demo expects integers"):
        SCHEMA.check({"a": torch.ones(1, 1), "size": torch.tensor([3.0, 4.0])})
    with pytest.raises(InputError, match="a holds torch.int64; demo expects floating-point"):
        SCHEMA.check({"a": torch.ones(1, 1, dtype=torch.int64)})
    with pytest.raises(InputError, match=r"size is \[0, 5\]"):
        SCHEMA.check({"a": torch.ones(1, 1), "size": torch.tensor([0, 5])})
    points = torch.tensor([[1.0, 2.0], [9.0, 9.0]])
    SCHEMA.check({"a": torch.ones(1, 1), "size": torch.tensor([10, 10]), "points": points})
    with pytest.raises(InputError, match=r"point 1 \(9, 9\) lies outside the 8×8 photo"):
        SCHEMA.check({"a": torch.ones(1, 1), "size": torch.tensor([8, 8]), "points": points})
    with pytest.raises(InputError, match="outside the 5×20 photo"):  # no size tensor: the photo's
        SCHEMA.check({"a": torch.ones(1, 1), "points": points}, size=(5, 20))
    with pytest.raises(InputError, match="a holds NaN or infinite values \\(1 of 2\\)"):
        SCHEMA.check({"a": torch.tensor([[1.0, float("inf")]])})


def test_one_reader_for_safetensors_torch_and_json(tmp_path):
    torch.save({"a": torch.ones(2, 4)}, tmp_path / "a.pt")
    assert read_identity_file(tmp_path / "a.pt", SCHEMA)["a"].shape == (2, 4)
    (tmp_path / "a.json").write_text(json.dumps({"a": [[1, 2.5]], "points": [[1, 1], [2, 2]]}))
    assert read_identity_file(tmp_path / "a.json", SCHEMA)["a"].dtype == torch.float64
    (tmp_path / "ragged.json").write_text(json.dumps({"a": [[1, 2], [3]]}))
    with pytest.raises(InputError, match="not a regular array"):
        read_identity_file(tmp_path / "ragged.json", SCHEMA)
    (tmp_path / "strings.json").write_text(json.dumps({"a": [["x"]]}))
    with pytest.raises(InputError, match="must be \\(nested lists of\\) numbers"):
        read_identity_file(tmp_path / "strings.json", SCHEMA)
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(InputError, match="cannot read"):
        read_identity_file(tmp_path / "junk.safetensors", SCHEMA)
    with pytest.raises(InputError, match="not found: it does not exist"):
        read_identity_file(tmp_path / "missing.safetensors", SCHEMA)


def test_the_face_file_round_trips_and_flattens_a_one_row_embedding(tmp_path):
    face = FaceEmbedding(torch.linspace(-1, 1, 512), torch.tensor(KPS, dtype=torch.float32), (64, 64))
    save_face_embedding(tmp_path / "face.safetensors", face)
    loaded = load_face_embedding(tmp_path / "face.safetensors")
    assert torch.equal(loaded.id_embedding, face.id_embedding) and loaded.image_size == (64, 64)
    assert load_face_embedding(_face(tmp_path, id_embedding=torch.ones(1, 512))).id_embedding.shape == (512,)


def test_pulid_embeddings_from_the_encoder_are_checked_by_the_same_schema():
    face = PuLIDFaceEmbedding(torch.ones(1, 1280), tuple(torch.ones(1, 577, 1024) for _ in range(5)))
    face.check(1280, 1024, "face")
    with pytest.raises(InputError, match="face: id_cond has shape \\(1, 1280\\); pulid expects \\(refs, 24\\)"):
        face.check(24, 1024, "face")
    assert RELEASED_DIMS == {"id_dim": 1280, "vit_dim": 1024, "patches": 577}


def test_magnitude_bound_is_far_above_real_embeddings():
    """An ArcFace embedding has norm ≈ 20–30 raw and 1 normalised: entries far below 10⁴."""
    raw = torch.nn.functional.normalize(torch.randn(512), dim=0) * 30
    assert raw.abs().max() < MAX_ABS / 100
    BACKENDS["infiniteyou"].identity_schema.check({"embedding": raw}, {"id_width": 512})


# ----------------------------------------------------------------------------------------- docs


DOC_TABLES = {
    "ip_adapter_faceid.md": ("ip-adapter-faceid", {"id_width": 512, "clip_width": 1280, "clip_tokens": 257}),
    "instantid.md": ("instantid", {"id_width": 512}),
    "infiniteyou.md": ("infiniteyou", {"id_width": 512}),
    "pulid.md": ("pulid-sdxl", RELEASED_DIMS),
}


@pytest.mark.parametrize("doc", sorted(DOC_TABLES))
def test_docs_carry_the_schema_table(doc):
    backend, dims = DOC_TABLES[doc]
    table = BACKENDS[backend].identity_schema.table(dims)
    text = (DOCS / doc).read_text(encoding="utf-8")
    assert table in text, f"docs/backends/{doc} lacks the table of {backend}'s identity schema:\n{table}"


def test_every_backend_with_a_file_option_declares_a_schema():
    for name, backend in BACKENDS.items():
        reads_file = any(
            re.search(r"--(face|identity)-embedding", line)
            for line in Path(__import__("inspect").getfile(backend)).read_text().splitlines()
        )
        if reads_file:
            assert isinstance(backend.identity_schema, IdentitySchema), name
