"""CelebAMask-HQ label set used by the released BiSeNet face parser (19 classes).

The ids are the ones the released ``79999_iter.pth`` predicts. Several attributes do not
care about left and right, so :data:`GROUPS` names unions of classes (``"eyes"`` is
``l_eye`` + ``r_eye``); :func:`class_ids` accepts both class and group names.
"""

from __future__ import annotations

from collections.abc import Iterable

CLASSES: tuple[str, ...] = (
    "background",  # 0
    "skin",  # 1
    "l_brow",  # 2
    "r_brow",  # 3
    "l_eye",  # 4
    "r_eye",  # 5
    "eye_g",  # 6  eyeglasses (and sunglasses)
    "l_ear",  # 7
    "r_ear",  # 8
    "ear_r",  # 9  earrings
    "nose",  # 10
    "mouth",  # 11 inner mouth
    "u_lip",  # 12
    "l_lip",  # 13
    "neck",  # 14
    "neck_l",  # 15 necklace
    "cloth",  # 16
    "hair",  # 17
    "hat",  # 18
)

CLASS_TO_ID: dict[str, int] = {name: index for index, name in enumerate(CLASSES)}

# Unions of classes for attributes that do not care about left/right.
GROUPS: dict[str, tuple[str, ...]] = {
    "brows": ("l_brow", "r_brow"),
    "eyes": ("l_eye", "r_eye"),
    "ears": ("l_ear", "r_ear"),
    "lips": ("u_lip", "l_lip"),
    "mouth_region": ("mouth", "u_lip", "l_lip"),
    "face": ("skin", "l_brow", "r_brow", "l_eye", "r_eye", "nose", "mouth", "u_lip", "l_lip"),
}

# Display colours (RGB) per class id for overlays.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (0, 0, 0),
    (255, 204, 153),
    (102, 51, 0),
    (153, 76, 0),
    (0, 128, 255),
    (0, 191, 255),
    (128, 0, 255),
    (255, 128, 128),
    (255, 153, 153),
    (255, 215, 0),
    (255, 102, 0),
    (204, 0, 102),
    (255, 0, 85),
    (204, 0, 51),
    (153, 102, 51),
    (0, 204, 153),
    (0, 102, 204),
    (139, 69, 19),
    (76, 153, 0),
)


def class_ids(names: Iterable[str]) -> tuple[int, ...]:
    """Class ids covered by class or group names, sorted and without repeats.

    Raises:
        KeyError: a name is neither a class of :data:`CLASSES` nor a group of :data:`GROUPS`.
    """
    ids: set[int] = set()
    for name in names:
        if name in GROUPS:
            ids.update(CLASS_TO_ID[member] for member in GROUPS[name])
        elif name in CLASS_TO_ID:
            ids.add(CLASS_TO_ID[name])
        else:
            known = ", ".join(list(CLASSES) + list(GROUPS))
            raise KeyError(f"unknown face-parser class {name!r}; known names: {known}")
    return tuple(sorted(ids))
