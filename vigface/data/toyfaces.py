"""The toy face world: procedural faces with identities, nuisances and exact landmarks.

No real face data ships with vigface, so every stage (alignment, FR training, diffusion,
metrics) runs end to end on these. A face is drawn from two independent random streams:

* identity (seed, identity)        -> head shape, skin tone, eyes, brows, nose, mouth, ears,
                                      hair style/colour, beard, glasses, a mole
* nuisance (seed, identity, index) -> yaw/pitch/roll, scale and shift, expression, lighting,
                                      background, clothing, blur, noise, occlusion

Features live on a 3-D ellipsoidal head and are projected orthographically after yaw and pitch,
so pose moves the five landmarks the way it does on real faces (the nose tip swings further
than the eyes). The face is drawn with PIL at 2x and box-reduced (anti-aliasing), into a
144x144 "wild" frame with roll/scale/shift; `render_aligned` then aligns it to the 112x112
ArcFace template through `vigface.data.align`, exactly as real data is aligned, and returns the
five landmarks in aligned coordinates.

Coordinates: "canonical" units are the 112x112 ArcFace frame, so a frontal, unrolled face has
its eyes, nose tip and mouth corners near the ArcFace template. Landmark order is the
insightface one: left eye, right eye, nose tip, left mouth corner, right mouth corner (left =
smaller x in the image).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

WILD_SIZE = 144  # the unaligned frame; larger than 112 so aligned crops have no empty corners
_SS = 2  # supersampling factor of the drawing canvas
_CANVAS = WILD_SIZE * _SS

# Streams of numpy's SeedSequence: identity and nuisance draws never share random numbers.
_STREAM_IDENTITY = 0
_STREAM_NUISANCE = 1

_SKIN_TONES = np.array(
    [(255, 224, 196), (241, 194, 150), (224, 172, 120), (198, 134, 80), (141, 90, 50), (92, 58, 38)],
    dtype=np.float64,
)
_HAIR_COLOURS = np.array(
    [
        (20, 16, 14),
        (60, 38, 24),
        (110, 70, 40),
        (200, 160, 90),
        (150, 60, 25),
        (150, 150, 150),
        (235, 225, 200),
    ],
    dtype=np.float64,
)
_IRIS_COLOURS = np.array(
    [(70, 40, 20), (40, 90, 160), (60, 110, 60), (110, 110, 120), (30, 20, 15)], dtype=np.float64
)
HAIR_STYLES = ("bald", "short", "long", "fringe", "side_part", "volume")


@dataclass(frozen=True)
class IdentityParams:
    """Everything that makes a toy person recognisable. Units: canonical pixels unless noted."""

    head_a: float  # half-width of the head ellipsoid
    head_b: float  # half-height
    jaw: float  # 0 = round chin, 1 = narrow pointed jaw
    skin: tuple[float, float, float]
    eye_dx: float  # half the distance between eye centres
    eye_y: float
    eye_w: float
    eye_h: float
    iris: tuple[float, float, float]
    brow_gap: float  # brow height above the eye
    brow_tilt: float  # radians; positive raises the outer end
    brow_thick: float
    nose_len: float
    nose_w: float
    nose_depth: float  # how far the tip stands out of the face surface
    mouth_dx: float
    mouth_y: float
    lip_thick: float
    lip_colour: tuple[float, float, float]
    ear_size: float
    hair_style: int
    hair_colour: tuple[float, float, float]
    hairline: float  # fraction of head_b above the centre where hair starts
    hair_volume: float
    beard: bool
    glasses: int  # 0 none, 1 round, 2 square
    glasses_colour: tuple[float, float, float]
    mole: tuple[float, float]  # (x offset, y offset) from the face centre; (0, 0) = none


@dataclass(frozen=True)
class Nuisance:
    """Per-image variation that must not change who the person is."""

    yaw: float  # radians, positive turns the face to the image's right
    pitch: float
    roll: float
    scale: float
    shift: tuple[float, float]
    smile: float  # raises the mouth corners
    mouth_open: float
    brow_raise: float
    eye_open: float
    light_angle: float
    light_strength: float
    brightness: float
    colour_cast: tuple[float, float, float]
    background: tuple[float, float, float]
    background2: tuple[float, float, float]
    clothing: tuple[float, float, float]
    blur: float  # gaussian radius in wild pixels
    noise: float  # std of additive noise, intensity levels
    occlusion: int  # 0 none, 1 mask over mouth and nose, 2 hand/patch, 3 sunglasses
    occlusion_colour: tuple[float, float, float]
    occlusion_pos: tuple[float, float]
    glasses_off: bool  # a glasses wearer sometimes takes them off


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


def _colour(rng: np.random.Generator, palette: np.ndarray, jitter: float) -> tuple[float, float, float]:
    """A continuous colour between two neighbouring palette entries, plus per-channel jitter."""
    t = rng.uniform(0, len(palette) - 1)
    i = min(int(t), len(palette) - 2)
    c = palette[i] * (1 - (t - i)) + palette[i + 1] * (t - i) + rng.normal(0, jitter, 3)
    return tuple(float(v) for v in np.clip(c, 0, 255))


def identity_params(seed: int, identity: int) -> IdentityParams:
    """Draw identity `identity` of the world `seed` (deterministic)."""
    r = _rng(seed, _STREAM_IDENTITY, identity)
    head_a = r.uniform(30, 38)
    hair_style = int(r.integers(len(HAIR_STYLES)))
    glasses = int(r.choice(3, p=[0.75, 0.125, 0.125]))
    has_mole = r.random() < 0.35
    return IdentityParams(
        head_a=head_a,
        head_b=r.uniform(40, 50),
        jaw=r.uniform(0, 1),
        skin=_colour(r, _SKIN_TONES, 8),
        eye_dx=r.uniform(14.5, 20.5),
        eye_y=r.uniform(-3, 3),
        eye_w=r.uniform(4.5, 7.5),
        eye_h=r.uniform(2.0, 3.6),
        iris=_colour(r, _IRIS_COLOURS, 10),
        brow_gap=r.uniform(5, 10),
        brow_tilt=r.uniform(-0.35, 0.35),
        brow_thick=r.uniform(1.2, 3.6),
        nose_len=r.uniform(14, 24),
        nose_w=r.uniform(4, 9),
        nose_depth=r.uniform(7, 15),
        mouth_dx=r.uniform(10, 17.5),
        mouth_y=r.uniform(-4, 4),
        lip_thick=r.uniform(1.5, 4.5),
        lip_colour=tuple(float(v) for v in np.clip(np.array([170, 80, 80]) + r.normal(0, 22, 3), 0, 255)),
        ear_size=r.uniform(6, 11),
        hair_style=hair_style,
        hair_colour=_colour(r, _HAIR_COLOURS, 12),
        hairline=r.uniform(0.45, 0.8),
        hair_volume=r.uniform(2, 10),
        beard=bool(r.random() < 0.2),
        glasses=glasses,
        glasses_colour=tuple(float(v) for v in r.uniform(0, 120, 3)),
        mole=(float(r.uniform(-20, 20)), float(r.uniform(-5, 20))) if has_mole else (0.0, 0.0),
    )


def nuisance_params(
    seed: int,
    identity: int,
    index: int,
    *,
    max_yaw: float = 0.65,
    max_roll: float = 0.45,
    yaw_range: tuple[float, float] | None = None,
) -> Nuisance:
    """Draw the nuisance of image `index` of `identity` (deterministic). Angles in radians.

    `yaw_range=(lo, hi)` draws |yaw| uniformly in [lo, hi] with a random sign instead (the
    frontal and profile halves of the cross-pose verification set).
    """
    r = _rng(seed, _STREAM_NUISANCE, identity, index)
    occlusion = int(r.choice(4, p=[0.82, 0.06, 0.07, 0.05]))
    yaw = float(np.clip(r.normal(0, max_yaw / 2), -max_yaw, max_yaw))
    if yaw_range is not None:
        yaw = float(np.copysign(r.uniform(*yaw_range), yaw))
    return Nuisance(
        yaw=yaw,
        pitch=float(r.uniform(-0.2, 0.2)),
        roll=float(np.clip(r.normal(0, max_roll / 2.5), -max_roll, max_roll)),
        scale=float(r.uniform(0.85, 1.15)),
        shift=(float(r.uniform(-8, 8)), float(r.uniform(-8, 8))),
        smile=float(r.uniform(-1, 1.5)),
        mouth_open=float(max(0.0, r.normal(0, 1.2))),
        brow_raise=float(r.uniform(-1.5, 2.5)),
        eye_open=float(np.clip(r.normal(1.0, 0.2), 0.15, 1.3)),
        light_angle=float(r.uniform(0, 2 * math.pi)),
        light_strength=float(r.uniform(0, 0.45)),
        brightness=float(r.uniform(0.7, 1.2)),
        colour_cast=tuple(float(v) for v in r.uniform(0.88, 1.12, 3)),
        background=tuple(float(v) for v in r.uniform(0, 255, 3)),
        background2=tuple(float(v) for v in r.uniform(0, 255, 3)),
        clothing=tuple(float(v) for v in r.uniform(0, 255, 3)),
        blur=float(r.choice([0.0, r.uniform(0.3, 1.6)], p=[0.55, 0.45])),
        noise=float(r.uniform(0, 8)),
        occlusion=occlusion,
        occlusion_colour=tuple(float(v) for v in r.uniform(0, 255, 3)),
        occlusion_pos=(float(r.uniform(-1, 1)), float(r.uniform(-1, 1))),
        glasses_off=bool(r.random() < 0.15),
    )


# ----------------------------------------------------------------------------- geometry


class _Head:
    """Projects points of the head ellipsoid (canonical frame) into the wild frame."""

    # Head centre in canonical coordinates: between the eyes and a little below, so a frontal
    # face puts its landmarks near the ArcFace template.
    CX, CY = 56.0, 64.0

    def __init__(self, p: IdentityParams, n: Nuisance):
        self.a, self.b, self.c = p.head_a, p.head_b, p.head_a * 0.95
        cy, sy = math.cos(n.yaw), math.sin(n.yaw)
        cp, sp = math.cos(n.pitch), math.sin(n.pitch)
        self.rot = np.array([[cy, 0, sy], [-sy * sp, cp, -cy * sp], [-sy * cp, sp, cy * cp]])
        # Canonical -> wild similarity: roll and scale about the head centre, then shift.
        s, cr, sr = n.scale, math.cos(n.roll), math.sin(n.roll)
        off = (WILD_SIZE - 112) / 2
        self.sim = np.array(
            [
                [s * cr, -s * sr, self.CX + off + n.shift[0]],
                [s * sr, s * cr, self.CY + off + n.shift[1]],
            ]
        )

    def surface_z(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Depth of the face surface at head-relative (x, y): the ellipsoid's front."""
        q = 1.0 - (x / self.a) ** 2 - (y / self.b) ** 2
        return self.c * np.sqrt(np.clip(q, 0.02, None))

    def rotate(self, xyz: np.ndarray) -> np.ndarray:
        return xyz @ self.rot.T

    def to_wild(self, xy: np.ndarray) -> np.ndarray:
        """Head-relative rotated (x, y) -> wild pixel coordinates."""
        return xy @ self.sim[:, :2].T + self.sim[:, 2]

    def project(self, x, y, z=None, lift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """Surface points (head-relative x, y; z defaults to the surface + lift) ->
        (wild xy (N, 2), depth after rotation (N,) used for visibility)."""
        x = np.atleast_1d(np.asarray(x, dtype=np.float64))
        y = np.broadcast_to(np.asarray(y, dtype=np.float64), x.shape)
        z = self.surface_z(x, y) + lift if z is None else np.broadcast_to(z, x.shape)
        r = self.rotate(np.stack([x, y, z], axis=-1))
        return self.to_wild(r[:, :2]), r[:, 2]

    def silhouette(self, n: int = 48, grow: float = 0.0) -> np.ndarray:
        """Outline of the rotated ellipsoid (orthographic), grown by `grow` canonical pixels."""
        # For a rotation R of the ellipsoid diag(a,b,c), the projected outline is the ellipse
        # with shape matrix (P R D^2 R^T P^T), P dropping z.
        d2 = np.diag([(self.a + grow) ** 2, (self.b + grow) ** 2, (self.c + grow) ** 2])
        m = (self.rot @ d2 @ self.rot.T)[:2, :2]
        w, v = np.linalg.eigh(m)
        t = np.linspace(0, 2 * math.pi, n, endpoint=False)
        circle = np.stack([np.cos(t), np.sin(t)], axis=-1)
        return self.to_wild(circle * np.sqrt(w) @ v.T)


def _ellipse_pts(cx: float, cy: float, rx: float, ry: float, n: int = 20) -> tuple[np.ndarray, np.ndarray]:
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    return cx + rx * np.cos(t), cy + ry * np.sin(t)


# ----------------------------------------------------------------------------- drawing


def _c(col) -> tuple[int, int, int]:
    return tuple(int(round(min(255, max(0, v)))) for v in col)


def _shade(col, k: float) -> tuple[int, int, int]:
    return _c([v * k for v in col])


def _poly(draw: ImageDraw.ImageDraw, xy: np.ndarray, fill=None, outline=None, width: float = 0) -> None:
    pts = [(float(x) * _SS, float(y) * _SS) for x, y in xy]
    if fill is not None:
        draw.polygon(pts, fill=fill)
    if outline is not None and width > 0:
        draw.line(pts + pts[:1], fill=outline, width=max(1, int(round(width * _SS))), joint="curve")


def _line(draw: ImageDraw.ImageDraw, xy: np.ndarray, fill, width: float) -> None:
    pts = [(float(x) * _SS, float(y) * _SS) for x, y in xy]
    draw.line(pts, fill=fill, width=max(1, int(round(width * _SS))), joint="curve")


def _draw_face(p: IdentityParams, n: Nuisance) -> tuple[Image.Image, np.ndarray]:
    """Draw one face into the wild frame; return the image and its 5 landmarks (wild coords)."""
    head = _Head(p, n)
    img = Image.new("RGB", (_CANVAS, _CANVAS), _c(n.background))
    draw = ImageDraw.Draw(img)
    scale = n.scale
    skin = p.skin
    hair = _c(p.hair_colour)

    # Background: a second colour as a diagonal band, so backgrounds are not flat.
    band = np.array([[0, 0.55], [1, 0.25], [1, 0.6], [0, 0.9]]) * WILD_SIZE
    _poly(draw, band, fill=_c(n.background2))

    # Shoulders and neck (clothing varies per image).
    neck_top, _ = head.project([-p.head_a * 0.45, p.head_a * 0.45], [p.head_b * 0.6] * 2, z=0.0)
    shoulders = np.array(
        [
            neck_top[0] + (-70 * scale, 70 * scale),
            neck_top[0] + (-18 * scale, 28 * scale),
            neck_top[1] + (18 * scale, 28 * scale),
            neck_top[1] + (70 * scale, 70 * scale),
        ]
    )
    _poly(draw, shoulders, fill=_c(n.clothing))
    neck = np.array([neck_top[0], neck_top[1], neck_top[1] + (0, 26 * scale), neck_top[0] + (0, 26 * scale)])
    _poly(draw, neck, fill=_shade(skin, 0.85))

    # Hair behind the head (long hair and volume styles).
    style = HAIR_STYLES[p.hair_style]
    if style in ("long", "volume"):
        back = head.silhouette(grow=p.hair_volume + (6 if style == "volume" else 2))
        if style == "long":
            lo = back[:, 1] > head.to_wild(np.zeros((1, 2)))[0, 1]
            back[lo, 1] += 26 * scale  # hair falls past the jaw
        _poly(draw, back, fill=hair)
    elif style != "bald":
        _poly(draw, head.silhouette(grow=p.hair_volume * 0.5), fill=hair)

    # Ears, drawn before the face so it covers their inner half; hidden when turned away.
    for side in (-1, 1):
        ex, depth = head.project([side * p.head_a * 0.98], [p.eye_y + 8], z=0.0)
        if depth[0] > -p.head_a * 0.35:
            ear = np.stack(
                _ellipse_pts(ex[0, 0], ex[0, 1], p.ear_size * 0.55 * scale, p.ear_size * scale, 12), -1
            )
            _poly(draw, ear, fill=_shade(skin, 0.9), outline=_shade(skin, 0.7), width=0.6 * scale)

    # Face: the silhouette with the lower half pulled in by the jaw parameter.
    sil = head.silhouette()
    centre = head.to_wild(np.zeros((1, 2)))[0]
    rel = sil - centre
    down = np.clip(rel @ np.array([-math.sin(n.roll), math.cos(n.roll)]) / (p.head_b * scale), 0, 1)
    rel *= (1 - 0.28 * p.jaw * down**2)[:, None]
    _poly(draw, centre + rel, fill=_c(skin))

    # Beard: darker hair colour over the jaw below the mouth corners.
    if p.beard:
        t = np.linspace(-0.9, 0.9, 15)
        bx = p.head_a * 0.9 * np.sin(t * 1.4)
        by = p.head_b * 0.93 * np.cos(t * 1.2) * (1 - 0.25 * p.jaw)
        top_x = np.linspace(p.mouth_dx + 4, -p.mouth_dx - 4, 6)
        xs = np.concatenate([bx, top_x])
        ys = np.concatenate([by, np.full(6, p.head_b * 0.45 + p.mouth_y)])
        pts, _ = head.project(xs, ys)
        _poly(draw, pts, fill=_shade(p.hair_colour, 0.9))

    # Hair on top of the forehead: the part of the head above the hairline.
    if style != "bald":
        t = np.linspace(-1.0, 1.0, 25)
        part = 0.2 if style == "side_part" else 0.0
        fringe = 0.25 if style == "fringe" else 0.0
        line_y = -p.head_b * (p.hairline - fringe) + 4 * np.abs(t - part) ** 2 * (
            1 if style != "fringe" else -0.5
        )
        xs = p.head_a * 0.999 * t
        front, _ = head.project(xs, line_y)
        top_t = np.linspace(0, math.pi, 15)
        top_x = p.head_a * np.cos(top_t)
        top_y = -p.head_b * np.sin(top_t)
        top, _ = head.project(top_x, top_y, lift=p.hair_volume * 0.3)
        _poly(draw, np.concatenate([front, top]), fill=hair)

    # Eyes: white, iris, pupil, lid line; openness from the expression.
    eye_centres = []
    iris_r = p.eye_h * 0.95
    for side in (-1, 1):
        ex, ey = side * p.eye_dx, -12.0 + p.eye_y
        c, depth = head.project([ex], [ey])
        eye_centres.append(c[0])
        if depth[0] < 2:
            continue
        openness = n.eye_open
        xs, ys = _ellipse_pts(ex, ey, p.eye_w, p.eye_h * openness, 18)
        white, _ = head.project(xs, ys)
        _poly(draw, white, fill=(238, 236, 230), outline=_shade(skin, 0.45), width=0.7 * scale)
        if openness > 0.35:
            look = 0.35 * p.eye_w * math.sin(n.yaw)
            xs, ys = _ellipse_pts(ex + look, ey, iris_r * 0.9, min(iris_r, p.eye_h * openness), 14)
            ir, _ = head.project(xs, ys, lift=0.3)
            _poly(draw, ir, fill=_c(p.iris))
            xs, ys = _ellipse_pts(ex + look, ey, iris_r * 0.42, min(iris_r * 0.42, p.eye_h * openness), 10)
            pu, _ = head.project(xs, ys, lift=0.4)
            _poly(draw, pu, fill=(12, 10, 10))

    # Brows.
    for side in (-1, 1):
        inner, outer = side * (p.eye_dx - p.eye_w), side * (p.eye_dx + p.eye_w * 1.3)
        by = -12.0 + p.eye_y - p.eye_h - p.brow_gap - n.brow_raise
        xs = np.linspace(inner, outer, 6)
        ys = by - np.linspace(0, 1, 6) * p.brow_tilt * p.eye_w * 2 - np.sin(np.linspace(0, math.pi, 6)) * 1.5
        pts, depth = head.project(xs, ys, lift=0.5)
        if depth.mean() > 2:
            _line(draw, pts, _shade(p.hair_colour, 0.8), p.brow_thick * scale)

    # Nose: a shaded bridge down to the tip, which stands out by nose_depth.
    tip_y = -12.0 + p.eye_y + p.nose_len
    ys = np.linspace(-12.0 + p.eye_y, tip_y, 6)
    zs = np.linspace(0, p.nose_depth, 6) + head.surface_z(np.zeros(6), ys)
    bridge, _ = head.project(np.zeros(6), ys, z=zs)
    side_shade = 1 if math.cos(n.light_angle) < 0 else -1
    wing_x = np.array([0, side_shade * p.nose_w, side_shade * p.nose_w * 0.6, 0])
    wing_y = np.array([tip_y - p.nose_len * 0.7, tip_y - 1, tip_y + 2, tip_y + 2])
    wing, _ = head.project(wing_x, wing_y, lift=p.nose_depth * 0.3)
    _poly(draw, wing, fill=_shade(skin, 0.82))
    _line(draw, bridge, _shade(skin, 0.7), 0.9 * scale)
    nose_tip, _ = head.project(
        [0.0], [tip_y], z=head.surface_z(np.zeros(1), np.array([tip_y])) + p.nose_depth
    )
    for side in (-1, 1):
        xs, ys = _ellipse_pts(side * p.nose_w * 0.45, tip_y + 1.5, p.nose_w * 0.22, 1.0, 8)
        nostril, depth = head.project(xs, ys, lift=p.nose_depth * 0.35)
        if depth.mean() > 2:
            _poly(draw, nostril, fill=_shade(skin, 0.4))

    # Mouth: corners rise with a smile; an open mouth shows a dark gap between the lips.
    my = 28.0 + p.mouth_y
    corner_y = my - 2.2 * n.smile
    t = np.linspace(-1, 1, 11)
    mx = p.mouth_dx * t
    centre_line = my + (corner_y - my) * t**2
    gap = n.mouth_open * 2.0 * (1 - t**2)
    upper_top = centre_line - p.lip_thick * (1 - t**2) * 0.8 - gap * 0.5
    lower_bot = centre_line + p.lip_thick * (1 - t**2) + gap * 0.5
    lips, _ = head.project(
        np.concatenate([mx, mx[::-1]]), np.concatenate([upper_top, lower_bot[::-1]]), lift=1.0
    )
    _poly(draw, lips, fill=_c(p.lip_colour))
    if n.mouth_open > 0.3:
        inner, _ = head.project(
            np.concatenate([mx, mx[::-1]]),
            np.concatenate([centre_line - gap * 0.5, (centre_line + gap * 0.5)[::-1]]),
            lift=1.1,
        )
        _poly(draw, inner, fill=(50, 20, 25))
    else:
        seam, _ = head.project(mx, centre_line, lift=1.1)
        _line(draw, seam, _shade(p.lip_colour, 0.55), 0.6 * scale)
    corners, _ = head.project([-p.mouth_dx, p.mouth_dx], [corner_y, corner_y], lift=1.0)

    if p.mole != (0.0, 0.0):
        m, depth = head.project([p.mole[0]], [p.mole[1]])
        if depth[0] > 4:
            mole = np.stack(_ellipse_pts(m[0, 0], m[0, 1], 1.1 * scale, 1.1 * scale, 8), -1)
            _poly(draw, mole, fill=_shade(skin, 0.35))

    if p.glasses and not n.glasses_off:
        rims = []
        for side in (-1, 1):
            ex, ey = side * p.eye_dx, -12.0 + p.eye_y
            if p.glasses == 1:
                xs, ys = _ellipse_pts(ex, ey, p.eye_w + 3.5, p.eye_w + 1.5, 18)
            else:
                w, h = p.eye_w + 4, p.eye_w + 1
                xs = np.array([ex - w, ex + w, ex + w, ex - w])
                ys = np.array([ey - h, ey - h, ey + h, ey + h])
            rim, depth = head.project(xs, ys, lift=p.nose_depth * 0.5)
            rims.append(rim)
            if depth.mean() > 0:
                _poly(draw, rim, outline=_c(p.glasses_colour), width=1.2 * scale)
        bridge_pts = np.stack([rims[0][len(rims[0]) // 4], rims[1][len(rims[1]) * 3 // 4]])
        _line(draw, bridge_pts, _c(p.glasses_colour), 1.2 * scale)

    # Occluders.
    if n.occlusion == 1:  # a mask over mouth and nose
        t = np.linspace(-1, 1, 13)
        xs = np.concatenate([p.head_a * 0.95 * t, p.head_a * 0.8 * t[::-1]])
        ys = np.concatenate([np.full(13, tip_y - 4), p.head_b * 0.88 - 8 * t[::-1] ** 2])
        pts, _ = head.project(xs, ys, lift=1.5)
        _poly(draw, pts, fill=_c(n.occlusion_colour))
    elif n.occlusion == 2:  # a hand or object somewhere over the face
        ox, oy = n.occlusion_pos
        cx = centre[0] + ox * p.head_a * 0.7 * scale
        cy = centre[1] + oy * p.head_b * 0.7 * scale
        blob = np.stack(_ellipse_pts(cx, cy, 14 * scale, 20 * scale, 16), -1)
        _poly(draw, blob, fill=_c(n.occlusion_colour))
    elif n.occlusion == 3:  # sunglasses
        for side in (-1, 1):
            xs, ys = _ellipse_pts(side * p.eye_dx, -12.0 + p.eye_y + 1, p.eye_w + 3, p.eye_w * 0.8 + 1, 16)
            pts, depth = head.project(xs, ys, lift=p.nose_depth * 0.5)
            if depth.mean() > 0:
                _poly(draw, pts, fill=(15, 15, 20))

    landmarks = np.stack([eye_centres[0], eye_centres[1], nose_tip[0], corners[0], corners[1]]).astype(
        np.float64
    )
    # Left/right by image position: a strong yaw or roll must not swap the insightface order.
    if landmarks[0, 0] > landmarks[1, 0]:
        landmarks[[0, 1]] = landmarks[[1, 0]]
    if landmarks[3, 0] > landmarks[4, 0]:
        landmarks[[3, 4]] = landmarks[[4, 3]]
    return img.reduce(_SS), landmarks


def _photometric(img: Image.Image, n: Nuisance, rng: np.random.Generator) -> np.ndarray:
    """Lighting gradient, brightness, colour cast, blur and sensor noise."""
    if n.blur > 0:
        img = img.filter(ImageFilter.GaussianBlur(n.blur))
    a = np.array(img, dtype=np.float32)
    coords = (np.arange(WILD_SIZE, dtype=np.float32) - WILD_SIZE / 2) / (WILD_SIZE / 2)
    gx = math.cos(n.light_angle) * coords[None, :]
    gy = math.sin(n.light_angle) * coords[:, None]
    gain = np.float32(n.brightness) * (1 + np.float32(n.light_strength) * (gx + gy))
    a *= gain[:, :, None]
    a *= np.asarray(n.colour_cast, dtype=np.float32)
    if n.noise > 0:
        a += rng.standard_normal(a.shape, dtype=np.float32) * np.float32(n.noise)
    a += 0.5  # round to nearest on the cast below
    return np.clip(a, 0, 255, out=a).astype(np.uint8)


def render_wild(seed: int, identity: int, index: int, **nuisance_kw) -> tuple[np.ndarray, np.ndarray]:
    """Image `index` of `identity` before alignment: (uint8 (144, 144, 3), landmarks (5, 2) float32).

    `nuisance_kw` (max_yaw, max_roll, yaw_range) narrows or widens the pose range.
    """
    p = identity_params(seed, identity)
    n = nuisance_params(seed, identity, index, **nuisance_kw)
    img, landmarks = _draw_face(p, n)
    noise_rng = _rng(seed, _STREAM_NUISANCE + 1, identity, index)
    return _photometric(img, n, noise_rng), landmarks.astype(np.float32)


def render_aligned(seed: int, identity: int, index: int, **nuisance_kw) -> tuple[np.ndarray, np.ndarray]:
    """Image `index` of `identity` aligned to the 112x112 ArcFace template.

    Returns (uint8 (112, 112, 3), landmarks (5, 2) float32 in aligned coordinates).
    """
    from vigface.data.align import align_faces, transform_points

    wild, landmarks = render_wild(seed, identity, index, **nuisance_kw)
    aligned, matrices = align_faces(wild[None], landmarks[None])
    return aligned[0], transform_points(landmarks[None], matrices)[0].astype(np.float32)


def identity_table(seed: int, identities) -> list[dict]:
    """JSON-ready identity parameters (written beside a toy dataset for inspection)."""
    rows = []
    for i in identities:
        d = asdict(identity_params(seed, int(i)))
        d["identity"] = int(i)
        d["hair_style"] = HAIR_STYLES[d["hair_style"]]
        rows.append(d)
    return rows
