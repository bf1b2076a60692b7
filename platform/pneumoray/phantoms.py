"""Phantom data set: synthetic pediatric chest radiographs, the embedded default data set.

The real data (Kermany et al., 2018: 5,232 pediatric chest X-rays, normal / bacterial / viral
pneumonia) cannot ship with the repo, so the demo trains on phantoms drawn here. They follow the
same folder layout and file naming as the Kaggle copy of that data set:

    DIR/{train,test}/NORMAL/IM-PPPP-000K.jpeg          PPPP = patient number, K = image 1, 2, ...
    DIR/{train,test}/PNEUMONIA/personN_bacteria_M.jpeg  N = patient number, M = running image
    DIR/{train,test}/PNEUMONIA/personN_virus_M.jpeg         number, unique across the set

Normal patients (IM-) and pneumonia patients (person) are numbered separately, as in Kermany.
Train and test hold different patients.

Each image is a projection of an analytic thorax: soft tissue of a cylinder-like torso, two
air-filled lungs cut by the diaphragm domes, heart and mediastinum, spine, ribs, clavicles and
vessel markings, pushed through an exponential attenuation curve. Anatomy is drawn once per
patient; every image of that patient then gets its own rotation, shift, exposure and noise.
The classes carry the features the paper names:

    normal    clear, dark, air-filled lung fields
    bacteria  a dense, well-defined consolidation confined to one lobe (or a round focus) of one
              lung; in about 30% a pleural effusion blunting the costophrenic angle
    virus     bilateral, diffuse, perihilar interstitial pattern: ground-glass haze, reticular
              lines and peribronchial streaks with poorly defined borders

Everything is seeded from (seed, patient index), so one patient's images do not depend on the
others, and the same seed gives byte-identical files.
"""

import hashlib
import json
import math
import os
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from .data.kermany import LABELS, parse_name

# Image counts of the Kermany data set (normal : bacteria : virus); patients are split alike.
KERMANY_COUNTS = {"normal": 1349, "bacteria": 2538, "virus": 1345}
# ~300 patients give ~580 images: enough for a tiny 64 px CLIP + LoRA to reach a high test
# macro-F1, small enough to train several times on 2 CPU cores within minutes.
DEFAULT_PATIENTS = 600
MARKER = "phantoms.json"
JPEG_QUALITY = 92
# Images per patient: mostly 1-3, sometimes more (follow-up films).
IMAGES_PER_PATIENT = (1, 2, 3, 4, 5)
IMAGES_PER_PATIENT_P = (0.45, 0.30, 0.15, 0.06, 0.04)

FOLDERS = {"normal": "NORMAL", "bacteria": "PNEUMONIA", "virus": "PNEUMONIA"}


# ---------------------------------------------------------------------------------------------
# Planning: which patient is which class, split, number, and how many images each has.


@dataclass
class PatientPlan:
    index: int  # global patient index, seeds the patient's generator
    cls: str
    split: str
    number: int  # IM-PPPP or personN
    files: list = field(default_factory=list)  # paths relative to the output folder


def class_counts(patients):
    """Patients per class, in the Kermany ratio (largest remainder, at least one each)."""
    total = sum(KERMANY_COUNTS.values())
    exact = {c: patients * KERMANY_COUNTS[c] / total for c in LABELS}
    counts = {c: int(exact[c]) for c in LABELS}
    for c in sorted(LABELS, key=lambda c: exact[c] - counts[c], reverse=True):
        if sum(counts.values()) == patients:
            break
        counts[c] += 1
    if patients >= len(LABELS):
        for c in LABELS:
            while counts[c] == 0:
                donor = max(LABELS, key=lambda d: counts[d])
                counts[donor] -= 1
                counts[c] += 1
    return counts


def _patient_rng(seed, index):
    return np.random.default_rng([seed, index])


def _image_count(rng):
    # First draw of the patient's generator, so planning and rendering agree on it.
    return int(rng.choice(IMAGES_PER_PATIENT, p=IMAGES_PER_PATIENT_P))


def plan_patients(patients=DEFAULT_PATIENTS, seed=0, test_fraction=0.2):
    """The patient list: class, split, number and file names of every patient."""
    if patients < 1:
        raise ValueError("patients must be >= 1")
    if seed < 0:
        raise ValueError("seed must be >= 0")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError("test_fraction must be in [0, 1)")
    counts = class_counts(patients)
    plan_rng = np.random.default_rng([seed, 2**31])  # a stream no patient index uses
    labels = np.array([c for c in LABELS for _ in range(counts[c])])
    labels = labels[plan_rng.permutation(patients)]

    split = np.full(patients, "train", dtype=object)
    for c in LABELS:
        members = np.flatnonzero(labels == c)
        n_test = int(round(len(members) * test_fraction))
        if test_fraction > 0 and len(members) >= 2:
            n_test = min(max(n_test, 1), len(members) - 1)  # keep both splits non-empty
        split[plan_rng.choice(members, size=n_test, replace=False)] = "test"

    plans, next_normal, next_person, running = [], 1, 1, 1
    for i in range(patients):
        cls = str(labels[i])
        n_images = _image_count(_patient_rng(seed, i))
        folder = f"{split[i]}/{FOLDERS[cls]}"
        if cls == "normal":
            p = PatientPlan(i, cls, split[i], next_normal)
            next_normal += 1
            p.files = [f"{folder}/IM-{p.number:04d}-{k:04d}.jpeg" for k in range(1, n_images + 1)]
        else:
            p = PatientPlan(i, cls, split[i], next_person)
            next_person += 1
            p.files = [f"{folder}/person{p.number}_{cls}_{running + k}.jpeg" for k in range(n_images)]
            running += n_images
        plans.append(p)
    return plans


# ---------------------------------------------------------------------------------------------
# Rendering. Coordinates are normalised: x, y in [-1, 1], x to the image right (the patient's
# left in a PA film), y downwards. "Density" is attenuation along the ray; brightness on the
# film is 1 - exp(-density), so overlapping structures saturate as on a real radiograph.


def _step(d, width):
    """Soft 0 -> 1 edge over about +-2 `width`: tissue borders blur, they are not cut-outs.

    A clipped smoothstep: the shape of a tanh edge at a third of its cost.
    """
    u = d * (0.25 / width)
    u += 0.5
    np.clip(u, 0, 1, out=u)
    s = u * u
    u *= -2
    u += 3
    s *= u
    return s


def _smooth_noise(rng, size, sigma_frac):
    """Zero-mean, unit-std gaussian random field with correlation length sigma_frac * size.

    Drawn on a coarse grid and upsampled: the same look as blurring full-size noise, at a
    fraction of the cost.
    """
    m = int(min(size, np.ceil(3.0 / sigma_frac)))
    f = ndimage.gaussian_filter(rng.standard_normal((m, m)).astype(np.float32),
                                sigma_frac * m, mode="wrap")
    if m != size:
        f = np.asarray(Image.fromarray(f).resize((size, size), Image.BILINEAR))
    return f / (f.std() + 1e-6)


def _angular_profile(rng, n_bins, peakiness):
    """Random 1-D profile over angle with sharp peaks: the spokes of vessels / bronchi."""
    prof = ndimage.gaussian_filter1d(rng.random(n_bins), 1.0, mode="wrap")
    prof = (prof - prof.min()) / (prof.max() - prof.min() + 1e-9)
    return (prof ** peakiness).astype(np.float32)


SPOKES = 360  # angular resolution of vessel / bronchus streaks around a hilum


def _radial_streaks(profile, spoke, r, length):
    """Branch-like streaks fanning out of a hilum: the profile looked up by angle bin (spoke),
    fading with the distance r from the hilum."""
    return profile[spoke] * np.exp(r * (-1 / length))


def _segment(x, y, x0, y0, x1, y1, width):
    """Soft band of the given half-width around the segment (x0, y0)-(x1, y1).

    x is a row and y a column of grid coordinates; only the segment's bounding box is computed.
    """
    x, y = x.ravel(), y.ravel()
    out = np.zeros((len(y), len(x)), dtype=np.float32)
    m = width + 0.02
    cols = np.flatnonzero((x > min(x0, x1) - m) & (x < max(x0, x1) + m))
    rows = np.flatnonzero((y > min(y0, y1) - m) & (y < max(y0, y1) + m))
    if len(cols) == 0 or len(rows) == 0:
        return out
    xs, ys = x[cols][None, :], y[rows][:, None]
    vx, vy = x1 - x0, y1 - y0
    h = np.clip(((xs - x0) * vx + (ys - y0) * vy) / (vx * vx + vy * vy), 0, 1)
    band = _step(width - np.hypot(xs - x0 - h * vx, ys - y0 - h * vy), 0.004)
    out[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] = band
    return out


class _Patient:
    """One patient's anatomy and disease, drawn once; image() renders one film of them."""

    def __init__(self, rng, cls, size):
        self.rng, self.cls, self.size = rng, cls, size
        c = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
        self.x, self.y = c[None, :], c[:, None]
        self._draw_anatomy()
        self._render_anatomy()
        if cls == "bacteria":
            self._draw_bacteria()
        elif cls == "virus":
            self._draw_virus()

    # -- anatomy ------------------------------------------------------------------------------

    def _draw_anatomy(self):
        r, viral = self.rng, self.cls == "virus"

        def u(lo, hi):
            return float(r.uniform(lo, hi))

        a = {}
        a["cx"] = float(r.normal(0, 0.015))  # thorax midline
        a["lat"] = u(0.60, 0.72)  # lateral lung edge at the base
        a["mid"] = u(0.07, 0.10)  # medial lung edge (half-width of the upper mediastinum)
        a["apex_x"] = a["mid"] + u(0.28, 0.40) * (a["lat"] - a["mid"])
        a["widen"] = u(0.04, 0.09)
        a["apex"] = u(-0.72, -0.60)
        a["base"] = u(0.36, 0.50) + (u(0.0, 0.04) if viral else 0.0)  # viral air trapping
        a["dome"] = u(0.09, 0.16) * (0.8 if viral else 1.0)  # ... flattens the domes
        a["right_higher"] = u(0.02, 0.06)  # the liver pushes the right dome up
        a["ctr"] = u(0.46, 0.58)  # cardiothoracic ratio; children's hearts are large
        a["heart_ry"] = u(0.19, 0.25)
        a["heart_tilt"] = u(0.25, 0.45)
        a["thymus"] = u(0.02, 0.07) if r.random() < 0.4 else 0.0  # wide upper mediastinum
        a["body"] = a["lat"] + u(0.12, 0.22)  # torso half-width
        a["neck"] = u(0.15, 0.21)
        a["shoulder"] = a["apex"] - u(0.06, 0.16)
        a["soft"] = u(1.25, 1.45)  # soft-tissue attenuation at the midline
        a["air"] = u(0.95, 1.05)  # how much the lungs lower it
        a["bone"] = u(0.16, 0.24)
        a["spine_w"] = u(0.05, 0.065)
        a["rib_sp"] = (a["base"] - a["apex"] + 0.15) / u(8.8, 9.6)
        a["rib_r0"] = a["apex"] - u(0.06, 0.10)
        a["rib_phase_r"], a["rib_phase_l"] = float(r.normal(0, 0.015)), float(r.normal(0, 0.015))
        a["rib_up"] = u(0.15, 0.35)  # posterior ribs rise a little, then curve down
        a["rib_down"] = u(1.0, 1.4)
        a["rib_th"] = u(0.22, 0.28)  # rib thickness as a fraction of the spacing
        a["ant_phase"] = u(0, 1)
        a["clavicles"] = r.random() < 0.85
        a["clav_y"] = a["apex"] + u(0.03, 0.10)
        a["stomach"] = r.random() < 0.7
        a["vessels"] = u(0.10, 0.15)
        a["rot"] = float(r.normal(0, 0.03))  # patient rotation (radians); images jitter on top
        a["scale"] = u(0.94, 1.06)  # how much of the child fills the frame
        a["mu"] = u(0.85, 1.05)  # exposure
        a["noise"] = u(0.012, 0.03)
        self.a = a

    def _render_anatomy(self):
        a, r, x, y, n = self.a, self.rng, self.x, self.y, self.size
        e = 0.012  # edge width of organ borders
        dx = x - a["cx"]
        ax = np.abs(dx)  # distance from the midline: both lungs in one pass
        right = dx < 0  # the patient's right lung is on the image left
        self.ax, self.right = ax, right

        # Lungs: rounded apex, widest at the base, medial border along the mediastinum.
        height = a["base"] - a["apex"]
        t = np.clip((y - a["apex"]) / height, 0, 1)
        q = 1 - t
        q2 = q * q
        lat_edge = a["apex_x"] + (a["lat"] - a["apex_x"]) * np.sqrt(1 - q2)
        # the mediastinum widens downwards into the hila and heart; a thymus widens it on top
        med_edge = (a["apex_x"] - (a["apex_x"] - a["mid"]) * np.sqrt(1 - q2 * q2 * q2)
                    + a["widen"] * _step(t - 0.55, 0.08)
                    + a["thymus"] * np.exp(-((t - 0.2) / 0.15) ** 2))
        base = np.where(right, a["base"] - a["right_higher"], a["base"]).astype(np.float32)
        xc, w = (a["mid"] + a["lat"]) / 2, (a["lat"] - a["mid"]) / 2
        dome_y = base - a["dome"] * np.clip(1 - ((ax - xc + 0.15 * w) / (1.1 * w)) ** 2, 0, 1)
        lung = (_step(lat_edge - ax, e) * _step(ax - med_edge, e)
                * _step(y - a["apex"], e) * _step(dome_y - y, e))

        # Heart: tilted ellipse, two thirds of it left of the midline (image right), sitting
        # on the diaphragm so that its lower border melts into the abdomen.
        hw = a["ctr"] * (a["lat"] + 0.03)
        hx = a["cx"] + hw / 3
        hy = a["base"] - 0.5 * a["dome"] - 0.7 * a["heart_ry"]
        ct, st = math.cos(a["heart_tilt"]), math.sin(a["heart_tilt"])
        hu, hv = (x - hx) * ct + (y - hy) * st, (y - hy) * ct - (x - hx) * st
        heart = _step(1 - np.sqrt((hu / hw) ** 2 + (hv / a["heart_ry"]) ** 2), 0.04)
        # aortic knob: a small bulge at the upper left mediastinal border
        knob = _step(0.05 - np.hypot(x - (a["cx"] + a["mid"] + 0.01), y - (a["apex"] + 0.3 * height)), e)
        heart = np.maximum(heart, knob)

        # Air path length: thicker in the middle and lower lung, thinner at apex and periphery;
        # the heart hides most of the lung behind it.
        depth = (0.55 + 0.45 * np.sqrt(t)) * (1 - 0.35 * ((ax - xc) / w) ** 2)
        air = lung * np.clip(depth, 0, 1) * (1 - 0.85 * heart)
        self.lung, self.air, self.t, self.xc, self.w, self.dome_y = lung, air, t, xc, w, dome_y

        # Soft tissue: torso with round cross-section, thinner neck, sloping shoulders.
        # The chest is barrel-shaped: a little narrower at the top.
        body = a["body"] * (1 - 0.08 * np.clip(a["base"] - y, 0, 1.2))
        over = np.clip(ax - a["neck"], 0, None) / (body - a["neck"])
        shoulder_y = a["shoulder"] + 0.35 * over * np.sqrt(over)
        below_shoulders = _step(y - shoulder_y, 0.04)
        torso = _step(body - ax, 0.025) * np.maximum(_step(a["neck"] - ax, 0.02), below_shoulders)
        thick = np.sqrt(np.clip(1 - (ax / body) ** 2, 0.0, 1))
        neck_thin = 0.7 + 0.3 * _step(y - a["shoulder"] - 0.05, 0.05)
        soft = torso * (0.1 + 0.9 * thick) * neck_thin
        # The heart and the great vessels above it form one dense central shadow.
        mediastinum = (_step(med_edge + 0.01 - ax, e) * _step(hy - y, 0.05)
                       * _step(y - a["apex"] + 0.05, 0.03))
        density = a["soft"] * soft - a["air"] * air + 0.12 * np.maximum(heart, mediastinum) * torso

        # Bowel gas in the upper abdomen: dark mottled blobs below the diaphragm.
        gas = np.clip(_smooth_noise(r, n, 0.035) - 1.1, 0, 0.8)
        density -= 0.5 * gas * _step(y - (dome_y + 0.12), 0.04) * _step(a["body"] - 0.1 - ax, 0.05)
        if a["stomach"]:  # gastric bubble under the left dome
            sx, sy = a["cx"] + xc, a["base"] - 0.5 * a["dome"] + 0.07
            bubble = (_step(1 - np.hypot((x - sx) / 0.1, (y - sy) / 0.05), 0.2)
                      * _step(y - (sy - 0.025), 0.01))
            density -= 0.3 * bubble

        # Trachea and main bronchi: a dark air column in the upper mediastinum.
        carina = a["apex"] + float(r.uniform(0.28, 0.36)) * height
        trachea = (_step(0.026 - ax, 0.008) * _step(carina - y, 0.01)).astype(np.float32)
        for side in (-1, 1):
            ang = float(r.uniform(0.55, 0.8))
            tip = (a["cx"] + side * 0.13 * math.sin(ang), carina + 0.13 * math.cos(ang))
            trachea = np.maximum(trachea, _segment(x, y, a["cx"], carina, *tip, 0.018))
        density -= 0.22 * trachea

        # Bones. Spine: a vertical band with vertebral bodies, faint behind the heart.
        vert = 0.75 + 0.25 * np.cos(np.pi * (y - a["rib_r0"]) / a["rib_sp"]) ** 2
        bone = 1.1 * _step(a["spine_w"] - ax, 0.01) * vert
        bone = bone + self._posterior_ribs(ax, y, right)
        # Anterior ribs: faint, running down towards the midline; their cartilage is invisible.
        ant_sp = a["rib_sp"] * 1.15
        ant_p = (y - (a["apex"] + 0.1) - 0.45 * (a["lat"] - ax)) / ant_sp + a["ant_phase"]
        ant_f = (ant_p - np.round(ant_p)) * (1 / (0.22 * ant_sp))
        ant_f *= ant_f
        ant = (np.exp(-ant_f * ant_f) * _step(ax - 0.3, 0.05) * _step(a["lat"] + 0.04 - ax, 0.02)
               * _step(y - a["apex"], 0.05) * _step(base - y, 0.05))
        bone = bone + 0.3 * ant
        if a["clavicles"]:
            cy = a["clav_y"] - 0.12 * (ax - 0.06) - 0.25 * (ax - 0.35) ** 2 + 0.03
            cf = ((y - cy) * (1 / 0.02)) ** 2
            bone = bone + 1.0 * np.exp(-cf * cf) * _step(ax - 0.06, 0.01) * _step(0.56 - ax, 0.04)
        density += a["bone"] * bone * torso

        # Hila and vessel markings: branching streaks that fade towards the periphery.
        self.hilum = (a["mid"] + 0.05, a["apex"] + 0.5 * height)
        hx_, hy_ = self.hilum
        theta = np.arctan2(y - hy_, ax - hx_) + 0.25 * _smooth_noise(r, n, 0.03)  # wobbly spokes
        self.spoke = (theta * (SPOKES / (2 * np.pi)) + SPOKES).astype(np.int32) % SPOKES
        self.r_hilum = np.hypot(ax - hx_, y - hy_)
        # each lung its own branching: the left lung looks up a second profile
        profile = np.concatenate([_angular_profile(r, SPOKES, 6), _angular_profile(r, SPOKES, 6)])
        vessels = _radial_streaks(profile, self.spoke + np.where(right, 0, SPOKES), self.r_hilum, 0.3)
        hilum = np.exp(-(((ax - hx_ - 0.02) / 0.05) ** 2 + ((y - hy_) / 0.08) ** 2))
        density += a["vessels"] * lung * (vessels + 0.8 * hilum)
        self.base_density = density.astype(np.float32)

    def _posterior_ribs(self, ax, y, right):
        """Curved bands from the spine, rising a little, then curving down the lateral wall."""
        a = self.a
        s = np.clip(ax - a["spine_w"] * 0.8, 0, None)
        centre = -a["rib_up"] * s + a["rib_down"] * s * s
        phase = np.where(right, a["rib_phase_r"], a["rib_phase_l"]).astype(np.float32)
        v = y - centre - a["rib_r0"] - phase
        p = v * (1 - 0.12 * v) / a["rib_sp"]  # the lower intercostal spaces are wider
        k = np.round(p)
        f = (p - k) * a["rib_sp"]
        half = 0.5 * a["rib_th"] * a["rib_sp"] * (1 + 0.3 * s)
        g = (f / half) ** 2
        band = np.exp(-g * g * g)
        cortex = np.exp(-((np.abs(f) - half) * (1 / 0.006)) ** 2)  # the bright bony edges
        rib = (0.45 * band + 0.35 * cortex) * ((k >= 0) & (k < 10))
        return rib * _step(ax - a["spine_w"] * 0.7, 0.01) * _step(a["lat"] + 0.06 - ax, 0.02)

    # -- disease ------------------------------------------------------------------------------

    def _draw_bacteria(self):
        r, n = self.rng, self.size
        d = {}
        d["side_right"] = r.random() < 0.6  # right-sided lobar pneumonia is more common
        d["kind"] = str(r.choice(["upper", "lower", "middle", "round"], p=[0.3, 0.3, 0.2, 0.2]))
        d["cut"] = float(r.uniform(0.40, 0.55))  # fissure position along the lung height
        d["tilt"] = float(r.uniform(-0.25, 0.25))
        d["centre"] = (float(r.uniform(0.35, 0.65)), float(r.uniform(0.35, 0.70)))  # round focus
        d["radius"] = float(r.uniform(0.17, 0.24))
        d["fill"] = float(r.uniform(0.80, 0.95))
        d["effusion"] = r.random() < 0.3
        d["eff_level"] = float(r.uniform(0.16, 0.28))
        d["lobul"] = _angular_profile(r, 64, 1.0) - 0.5
        d["texture"] = _smooth_noise(r, n, 0.02)
        d["bronchi"] = _radial_streaks(_angular_profile(r, SPOKES, 10), self.spoke, self.r_hilum, 0.5)
        self.d = d

    def _bacteria_density(self, jitter):
        d, a, ax, y, t = self.d, self.a, self.ax, self.y, self.t
        side = self.right if d["side_right"] else ~self.right
        lung = self.lung * side
        u = (ax - self.xc) / self.w  # -1 medial .. 1 lateral
        cut = d["cut"] + 0.03 * jitter[0]
        e = 0.015  # a fissure gives a sharp margin
        if d["kind"] == "upper":
            # On the right the lower border is the horizontal fissure, which bows slightly;
            # the left lung has none, so its border there is softer.
            wavy = 0.03 * (1 - u * u) + 0.01 * d["texture"]
            region = _step(cut + 0.2 * d["tilt"] * u + wavy - t, e if d["side_right"] else 3 * e)
        elif d["kind"] == "lower":
            # the major fissure is oblique to the beam: a softer upper border
            region = _step(t - cut - 0.2 * d["tilt"] * u - 0.04 * d["texture"], 3 * e)
        elif d["kind"] == "middle":
            # middle lobe / lingula: lower medial lung, effacing the heart border (the lingula
            # wraps round the heart, so it reaches further out)
            uc = -0.3 if d["side_right"] else 0.0
            region = (_step(t - cut + 0.05, e)
                      * _step(1 - np.hypot((u - uc) * (1 / 1.15), (t - 0.72) * (1 / 0.32)), 0.08))
        else:
            cx, cy = d["centre"]
            px, py = self.xc + (2 * cx - 1) * self.w, a["apex"] + cy * (a["base"] - a["apex"])
            # a lobulated outline: the radius wobbles with the angle around the centre
            bins = len(d["lobul"])
            ang = np.arctan2(y - py, ax - px)
            lob = d["lobul"][((ang * (1 / (2 * np.pi)) + 0.5) * bins).astype(np.int32) % bins]
            rad = d["radius"] * (1 + 0.08 * jitter[1]) * (1 + 0.12 * lob)
            region = _step(rad - np.hypot(ax - px, (y - py) * 0.9), 0.02)
        # Consolidation: the alveoli fill with fluid, so the air nearly disappears; patchy inside,
        # with dark air bronchograms where the bronchi stay open.
        fill = min(max(d["fill"] + 0.05 * jitter[2], 0.0), 1.0)
        patch = np.clip(1 - 0.12 * d["texture"] - 0.35 * d["bronchi"], 0, 1)
        opacity = lung * region * fill * patch
        dens = (a["air"] * self.air + 0.08) * opacity
        if d["effusion"]:
            # Fluid gathers at the base with a meniscus climbing the lateral wall; it blunts the
            # costophrenic angle and hides the dome.
            level = a["base"] - d["eff_level"] * (1 + 0.1 * jitter[1])
            if d["side_right"]:
                level -= a["right_higher"]
            surface = level + 0.2 * np.clip(0.5 - 0.5 * u, 0, 1) ** 2
            fluid = (_step(y - surface, 0.012) * _step(self.dome_y + 0.03 - y, 0.015) * side
                     * _step(a["lat"] + 0.02 - ax, 0.015) * _step(ax - a["mid"], 0.02))
            dens = np.maximum(dens, (a["air"] * self.air + 0.15) * fluid)
        return dens

    def _draw_virus(self):
        r, n = self.rng, self.size
        v = {}
        v["haze"] = np.clip(0.6 * _smooth_noise(r, n, 0.05) + 0.6, 0, None)  # patchy ground glass
        band = _smooth_noise(r, n, 0.008) - 0.5 * _smooth_noise(r, n, 0.025)
        v["reticular"] = np.exp(-(band * (1 / 0.5)) ** 2)  # zero crossings: a fine network
        v["streaks"] = _radial_streaks(_angular_profile(r, SPOKES, 3), self.spoke, self.r_hilum, 0.45)
        v["amount"] = float(r.uniform(0.45, 0.6))
        v["perihilar"] = float(r.uniform(0.35, 0.5))
        self.v = v

    def _virus_density(self, jitter):
        v, a = self.v, self.a
        # Bilateral and perihilar: strongest around the hila, fading towards the periphery.
        hx, hy = self.hilum
        rh = np.hypot((self.ax - hx) * (1 / 1.2), self.y - hy)
        weight = 0.45 + np.exp(-(rh * (1 / v["perihilar"])) ** 2)
        amount = v["amount"] * (1 + 0.12 * jitter[0])
        pattern = 0.7 * v["haze"] + 0.25 * v["reticular"] + 0.6 * v["streaks"]
        return a["air"] * self.air * np.clip(amount * weight * pattern, 0, 0.85)

    # -- films --------------------------------------------------------------------------------

    def image(self):
        """One film: this patient's anatomy and disease, with its own positioning and exposure."""
        r, a, n = self.rng, self.a, self.size
        jitter = [float(j) for j in r.normal(0, 1, 3)]
        density = self.base_density
        if self.cls == "bacteria":
            density = density + self._bacteria_density(jitter)
        elif self.cls == "virus":
            density = density + self._virus_density(jitter)

        # Positioning: rotation, scale and shift; sample the patient frame on the film grid.
        rot = a["rot"] + r.normal(0, 0.02)
        scale = a["scale"] * (1 + r.normal(0, 0.02))
        shift = r.normal(0, 0.03, 2) * n / 2
        film = _warp(density, rot, scale, shift)

        # Exposure: the attenuation curve, with the anode heel effect's slight gradient.
        mu = a["mu"] * (1 + r.normal(0, 0.05))
        img = 1 - np.exp(np.maximum(film, 0) * -mu)
        img *= 1 - 0.06 * r.uniform(0, 1) * (self.y - r.uniform(-1, 1))
        # Quantum noise, then the detector and focal-spot blur, which also softens the noise.
        noise = r.standard_normal((n, n), dtype=np.float32)
        noise *= 0.4 + 0.6 * np.sqrt(np.clip(img, 0, 1))
        img += (2.2 * a["noise"]) * noise
        img = ndimage.gaussian_filter(img, max(r.uniform(0.5, 0.9) * n / 256, 0.4), truncate=3.0)
        # Display: window and gamma, as a lookup table on a 12-bit signal.
        lo, hi, gamma = r.uniform(0.0, 0.06), r.uniform(0.86, 0.95), r.uniform(0.85, 1.2)
        lut = np.clip((np.linspace(0, 1, 4096) - lo) / (hi - lo), 0, 1) ** gamma
        lut = np.round(lut * 255).astype(np.uint8)
        return lut[np.clip(img * 4095 + 0.5, 0, 4095).astype(np.int32)]


def _warp(density, rot, scale, shift):
    """Resample the patient frame onto the film: rotate by rot, zoom by scale, shift (pixels).

    Edges are replicated first, so a shifted film shows more abdomen or neck, not a black band.
    """
    n = density.shape[0]
    pad = n // 6
    padded = Image.fromarray(np.pad(density.astype(np.float32), pad, mode="edge"))
    c, s = np.cos(rot) / scale, np.sin(rot) / scale
    # PIL maps each output pixel (i, j) to the input pixel (a i + b j + c, d i + e j + f).
    centre = n / 2
    ox, oy = centre + shift[0], centre + shift[1]
    coeffs = (c, -s, centre + pad - c * ox + s * oy, s, c, centre + pad - s * ox - c * oy)
    film = padded.transform((n, n), Image.AFFINE, coeffs, resample=Image.BILINEAR)
    return np.asarray(film)


def render_patient(cls, seed, index, size=256):
    """All films of one patient as uint8 arrays (size x size), drawn from rng(seed, index)."""
    if cls not in LABELS:
        raise ValueError(f"unknown class {cls!r}")
    rng = _patient_rng(seed, index)
    n_images = _image_count(rng)
    patient = _Patient(rng, cls, size)
    return [patient.image() for _ in range(n_images)]


# ---------------------------------------------------------------------------------------------
# Writing.


def _write_atomic(path, image, fmt, **save_args):
    """Write through a hidden temp file in the same folder, so a crash leaves no half image."""
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.tmp")
    image.save(tmp, format=fmt, **save_args)
    os.replace(tmp, path)


def _remove_stale(out_dir, planned):
    """Drop phantom files (and temp files) a previous, different run left in our folders."""
    removed = 0
    for split in ("train", "test"):
        for folder in ("NORMAL", "PNEUMONIA"):
            d = os.path.join(out_dir, split, folder)
            if not os.path.isdir(d):
                continue
            for name in os.listdir(d):
                rel = f"{split}/{folder}/{name}"
                ours = name.endswith(".jpeg") and parse_name(name[:-len(".jpeg")])[0] is not None
                temp = name.startswith(".") and name.endswith(".tmp")
                if (ours and rel not in planned) or temp:
                    os.remove(os.path.join(d, name))
                    removed += 1
    return removed


def contact_sheet(out_dir, plans, per_row=6, thumb=128):
    """A PNG grid: one row per split and class, one image per patient, labelled."""
    rows = [(s, c) for s in ("train", "test") for c in LABELS]
    label_w, pad = 120, 4
    width, height = label_w + per_row * (thumb + pad) + pad, len(rows) * (thumb + pad) + pad
    sheet = Image.new("L", (width, height), 255)
    draw = ImageDraw.Draw(sheet)
    try:
        font = ImageFont.load_default(size=18)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: the small bitmap font
        font = ImageFont.load_default()
    for i, (split, cls) in enumerate(rows):
        top = pad + i * (thumb + pad)
        draw.text((10, top + thumb // 2 - 22), f"{cls}\n{split}", fill=0, font=font, spacing=6)
        picks = [p for p in plans if p.split == split and p.cls == cls][:per_row]
        for j, p in enumerate(picks):
            with Image.open(os.path.join(out_dir, p.files[0])) as im:
                sheet.paste(im.convert("L").resize((thumb, thumb), Image.BILINEAR),
                            (label_w + pad + j * (thumb + pad), top))
    path = os.path.join(out_dir, "contact_sheet.png")
    _write_atomic(path, sheet, "PNG")
    return path


def _paths(out_dir):
    return {"out_dir": os.path.abspath(out_dir), "contact_sheet": os.path.join(os.path.abspath(out_dir), "contact_sheet.png")}


def generate_phantoms(out_dir, patients=DEFAULT_PATIENTS, seed=0, size=256, test_fraction=0.2):
    """Write the phantom data set under out_dir and return a summary.

    Summary keys: out_dir, seed, size, patients, images, counts ({split: {class: images}}),
    patients_per_split ({split: {class: patients}}), contact_sheet (path), removed_stale.
    """
    if size < 32:
        raise ValueError("size must be >= 32")
    plans = plan_patients(patients, seed, test_fraction)
    params = {"patients": patients, "seed": seed, "size": size, "test_fraction": test_fraction}
    marker = os.path.join(out_dir, MARKER)
    if os.path.exists(marker):  # a finished set with the same parameters: nothing to redo
        with open(marker) as f:
            done = json.load(f)
        if done.get("params") == params and all(os.path.exists(os.path.join(out_dir, r)) for p in plans for r in p.files):
            return {**done["summary"], **_paths(out_dir), "removed_stale": 0}
    for split in ("train", "test"):
        for folder in ("NORMAL", "PNEUMONIA"):
            os.makedirs(os.path.join(out_dir, split, folder), exist_ok=True)
    removed = _remove_stale(out_dir, {f for p in plans for f in p.files})

    counts = {s: {c: 0 for c in LABELS} for s in ("train", "test")}
    people = {s: {c: 0 for c in LABELS} for s in ("train", "test")}
    for p in plans:
        images = render_patient(p.cls, seed, p.index, size)
        for rel, pixels in zip(p.files, images):
            _write_atomic(os.path.join(out_dir, rel), Image.fromarray(pixels), "JPEG",
                          quality=JPEG_QUALITY)
        counts[p.split][p.cls] += len(images)
        people[p.split][p.cls] += 1

    summary = {
        "out_dir": os.path.abspath(out_dir),
        "seed": seed,
        "size": size,
        "patients": patients,
        "images": sum(sum(v.values()) for v in counts.values()),
        "counts": counts,
        "patients_per_split": people,
        "contact_sheet": contact_sheet(out_dir, plans),
        "removed_stale": removed,
    }
    # Written last: its presence means the set is complete, and it marks the folder as phantoms
    # (the manifest records source=phantom).
    with open(marker + ".tmp", "w") as f:
        # without absolute paths, so the same seed gives the same bytes in any folder
        json.dump({"params": params, "summary": {k: v for k, v in summary.items() if k not in _paths(out_dir)}}, f, indent=2)
    os.replace(marker + ".tmp", marker)
    return summary


def file_digests(out_dir):
    """sha256 of every file under out_dir, keyed by relative path (for determinism checks)."""
    digests = {}
    for root, _, files in os.walk(out_dir):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                digests[os.path.relpath(path, out_dir)] = hashlib.sha256(f.read()).hexdigest()
    return digests
