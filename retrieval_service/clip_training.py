"""Contrastive CLIP training on a catalogue's images and captions."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from retrieval_service.clip_heldout import format_figures, heldout_figures
from retrieval_service.clip_model import TRAIN_STEPS

DEFAULT_LR = 1e-3  # from scratch (AdamW, batch 128)
FINETUNE_LR = 1e-5  # pretrained weights: small steps keep what pre-training learnt
MIN_CAPTION_CONFIDENCE = 0.4  # keywords below this are mostly a tagger's confusions
SENTENCE_SHARE = 0.3  # share of captions that are a full description rather than keywords
KEYWORDS_PER_CAPTION = (1, 2, 3)
KEYWORDS_PER_CAPTION_P = (0.4, 0.4, 0.2)
# Photos a training run decodes and draws its batches from, at most (a seeded sample beyond):
# 1,200 steps of 128 pairs see the 90,000 trained on about 1.7 times, as they saw the 100,000-photo
# demo; a million photos would take 12 GB of decoded 64 px pixels for batches that never reach
# most of them.
MAX_TRAIN_PHOTOS = 100_000
# Held-out query families: {family: words} and the two families whose words pair up.
QueryFamilies = tuple[dict[str, list[str]], tuple[str, str] | None]


@dataclass
class CaptionPool:
    """What each training photo can be captioned with.

    Attributes
    ----------
    keywords:
        Per photo, its keywords with confidence >= the caption threshold, best first.
    confidences:
        Per photo, those keywords' confidences (sampling weights).
    descriptions:
        Per photo, its non-empty descriptions (``photo_description``, ``ai_description``).
    """

    keywords: list[list[str]]
    confidences: list[np.ndarray]
    descriptions: list[list[str]]

    def sample(self, i: int, rng: np.random.Generator) -> tuple[str, frozenset[str] | None]:
        """One caption of photo ``i``: (text, its keyword set or None for a sentence)."""
        keywords = self.keywords[i]
        if self.descriptions[i] and (not keywords or rng.random() < SENTENCE_SHARE):
            text = self.descriptions[i][rng.integers(len(self.descriptions[i]))]
            return text, None
        n = min(len(keywords), int(rng.choice(KEYWORDS_PER_CAPTION, p=KEYWORDS_PER_CAPTION_P)))
        weights = self.confidences[i] / self.confidences[i].sum()
        picked = rng.choice(len(keywords), size=n, replace=False, p=weights)
        words = [keywords[j] for j in picked]  # random order: "circle red" works as well
        return " ".join(words), frozenset(words)


def caption_pool(
    catalogue: Any,
    photo_idx: np.ndarray,
    min_confidence: float = MIN_CAPTION_CONFIDENCE,
    max_keywords: int = 20,
) -> CaptionPool:
    """Gather the caption material of the given photos (see :class:`CaptionPool`)."""
    keywords = catalogue.keywords
    keywords = keywords[
        (keywords["confidence"] >= min_confidence) & keywords["photo_idx"].isin(photo_idx)
    ]
    keywords = keywords.sort_values(
        ["photo_idx", "confidence", "keyword"], ascending=[True, False, True], kind="stable"
    )
    grouped = {
        int(idx): (group["keyword"].tolist()[:max_keywords], group["confidence"].to_numpy())
        for idx, group in keywords.groupby("photo_idx", sort=False)
    }
    photos = catalogue.photos.set_index("photo_idx")
    kw_lists, conf_lists, desc_lists = [], [], []
    for idx in photo_idx.tolist():
        words, conf = grouped.get(int(idx), ([], np.zeros(0)))
        kw_lists.append(list(words))
        conf_lists.append(np.asarray(conf[: len(words)], np.float64) + 1e-6)
        row = photos.loc[idx]
        texts = [str(row[c]).strip() for c in ("photo_description", "ai_description")]
        desc_lists.append(list(dict.fromkeys(t for t in texts if t and t != "nan")))
    return CaptionPool(kw_lists, conf_lists, desc_lists)


def load_image_tensor(
    paths: list[Path], image_size: int, show_progress: bool = True
) -> tuple[Any, np.ndarray]:
    """Decode images once into one uint8 tensor ``(n, 3, S, S)`` (shortest side, centre crop).

    Returns
    -------
    images : torch.Tensor
        uint8 pixels of the images that decoded.
    ok : numpy.ndarray
        Boolean per path: whether it decoded (missing or corrupt files are False).
    """
    import torch
    from PIL import Image
    from tqdm.auto import tqdm

    out = torch.zeros((len(paths), 3, image_size, image_size), dtype=torch.uint8)
    ok = np.zeros(len(paths), bool)
    for i, path in enumerate(
        tqdm(paths, desc="load images", unit="img", disable=not show_progress, file=sys.stderr)
    ):
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
                scale = image_size / min(image.size)
                if image.size != (image_size, image_size):
                    size = (max(image_size, round(image.width * scale)),) + (
                        max(image_size, round(image.height * scale)),
                    )
                    image = image.resize(size, Image.BICUBIC)
                    left = (image.width - image_size) // 2
                    top = (image.height - image_size) // 2
                    image = image.crop((left, top, left + image_size, top + image_size))
                pixels = np.asarray(image, dtype=np.uint8)
        except (OSError, ValueError, SyntaxError):
            continue
        out[i] = torch.from_numpy(pixels.copy()).permute(2, 0, 1)
        ok[i] = True
    return out, ok


def _normaliser(bundle: Any) -> tuple[Any, Any]:
    import torch

    cfg = bundle.preprocess_config()
    mean = torch.tensor(cfg["mean"], dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"], dtype=torch.float32).view(1, 3, 1, 1)
    return mean, std


def _augment(batch: Any, generator: Any, pad: int) -> Any:
    """Light augmentation: random shift by up to ``pad`` pixels (reflected) and mirror.

    No colour jitter and no aggressive crops: colour and the whole shape are what captions name.
    """
    import torch
    import torch.nn.functional as F

    n, _, size, _ = batch.shape
    padded = F.pad(batch, (pad, pad, pad, pad), mode="reflect")
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5
    out = torch.empty_like(batch)
    for j in range(n):
        y, x = int(offsets[j, 0]), int(offsets[j, 1])
        crop = padded[j, :, y : y + size, x : x + size]
        out[j] = crop.flip(-1) if flips[j] else crop
    return out


def _positives(
    captions: list[tuple[str, frozenset[str] | None]], photo_keywords: list[frozenset[str]]
) -> np.ndarray:
    """``P[i, j]``: caption ``j`` truly describes image ``i`` of the batch.

    Captions of bare keywords repeat within a batch ("red" for every red photo); treating those
    as negatives would push apart what is alike. A keyword caption matches every image tagged
    with all its keywords, a sentence matches images it was written for (the same text).
    """
    n = len(captions)
    positive = np.eye(n, dtype=bool)
    for j, (text, words) in enumerate(captions):
        for i in range(n):
            if i == j:
                continue
            if words is not None:
                positive[i, j] = words <= photo_keywords[i]
            else:
                positive[i, j] = text == captions[i][0]
    return positive


def _contrastive_loss(image_emb: Any, text_emb: Any, logit_scale: Any, positive: Any) -> Any:
    """InfoNCE both ways (CLIP), with soft targets spread over every true pair in the batch."""
    logits = logit_scale.exp() * image_emb @ text_emb.t()
    targets_i2t = positive / positive.sum(dim=1, keepdim=True)
    targets_t2i = positive.t() / positive.t().sum(dim=1, keepdim=True)
    loss_i2t = -(targets_i2t * logits.log_softmax(dim=1)).sum(dim=1).mean()
    loss_t2i = -(targets_t2i * logits.t().log_softmax(dim=1)).sum(dim=1).mean()
    return (loss_i2t + loss_t2i) / 2


def _param_groups(model: Any, weight_decay: float) -> list[dict]:
    """open_clip's grouping: no weight decay on gains, biases, norms and the logit scale."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exclude = (
            param.ndim < 2
            or "bn" in name
            or "ln" in name
            or "bias" in name
            or "logit_scale" in name
        )
        (no_decay if exclude else decay).append(param)
    return [
        {"params": no_decay, "weight_decay": 0.0},
        {"params": decay, "weight_decay": weight_decay},
    ]


def train_clip(
    catalogue: Any,
    out_dir: str | Path,
    model_name: str = "imgsearch-tiny-clip",
    pretrained: str | None = None,
    steps: int = TRAIN_STEPS,
    batch_size: int = 128,
    lr: float | None = None,
    seed: int = 0,
    show_progress: bool = True,
    heldout_share: float = 0.1,
    weight_decay: float = 0.1,
    warmup_share: float = 0.1,
    min_confidence: float = MIN_CAPTION_CONFIDENCE,
    threads: int | None = None,
    query_families: QueryFamilies | None = None,
    max_photos: int | None = MAX_TRAIN_PHOTOS,
) -> dict:
    """Train (or fine-tune) a CLIP on the catalogue's images and captions, and save it.

    Captions mix full sentences (the photo's descriptions) with 1-3 keyword subsets of its
    keywords ("red", "red circle", "circle night"), so bare-keyword queries work. The loss is
    CLIP's symmetric InfoNCE with open_clip's learnable logit scale, with every true pair of the
    batch as a target (see :func:`_positives`). A fixed number of AdamW steps with warm-up and
    cosine decay keeps runs deterministic for a seed. About 10% of photos are held out and
    the held-out retrieval figure is printed at the end.

    Images are decoded once into memory at the model's input size: 5,000 demo photos at 64 px
    take 61 MB; fine-tuning a 224 px model on 25k photos takes 3.8 GB. Beyond ``max_photos``
    photos with images, a seeded sample of that many is used (training and held-out alike).

    Parameters
    ----------
    catalogue:
        The catalogue; photos with ``has_image`` and at least one caption are used.
    out_dir:
        CLIP folder to write (:func:`~retrieval_service.clip_model.save_clip`), with the
        training figures in its ``clip.json``.
    model_name:
        open_clip model name; the project's tiny config by default.
    pretrained:
        Weights to fine-tune (open_clip tag, checkpoint file or CLIP folder); None trains from
        scratch.
    steps, batch_size:
        Optimisation steps and pairs per step.
    lr:
        Peak learning rate; None means 1e-3 from scratch and 1e-5 when fine-tuning.
    seed:
        Seeds the split, the captions, the augmentation and the initial weights.
    show_progress:
        tqdm bars (loading, training with the loss) and the printed figures.
    heldout_share:
        Share of photos held out of training for the figure.
    weight_decay, warmup_share:
        AdamW weight decay (not on gains, biases, the logit scale) and warm-up share of steps.
    min_confidence:
        Keywords below this confidence are not used in captions.
    threads:
        Torch intra-op threads while training; None takes the idle cores
        (:func:`~imgsearch.cpu.auto_threads`). Restored afterwards.
    query_families:
        ``(families, pair_of)`` for the held-out figure (see :func:`heldout_figures`), e.g. the
        demo's colour, shape and scene words; None uses the most frequent keywords and pairs.
    max_photos:
        Photos to train and hold out from, at most (:data:`MAX_TRAIN_PHOTOS`); None: all.

    Returns
    -------
    dict
        ``model_name``, ``pretrained``, ``steps``, ``batch_size``, ``lr``, ``seed``,
        ``train_photos``, ``heldout_photos``, ``sampled_from`` (photos with images, when a
        sample was drawn), ``skipped_images``, ``final_loss``, ``seconds``,
        ``heldout`` (per-family figures, see :func:`heldout_figures`), ``path`` and
        ``threads``.
    """
    from imgsearch.cpu import torch_threads

    with torch_threads(threads) as used_threads:
        result = _train_clip(
            catalogue, out_dir, model_name, pretrained, steps, batch_size, lr, seed,
            show_progress, heldout_share, weight_decay, warmup_share, min_confidence,
            query_families, max_photos,
        )  # fmt: skip
    result["threads"] = used_threads
    return result


def _train_clip(
    catalogue: Any,
    out_dir: str | Path,
    model_name: str,
    pretrained: str | None,
    steps: int,
    batch_size: int,
    lr: float | None,
    seed: int,
    show_progress: bool,
    heldout_share: float,
    weight_decay: float,
    warmup_share: float,
    min_confidence: float,
    query_families: QueryFamilies | None,
    max_photos: int | None,
) -> dict:
    import torch
    from tqdm.auto import tqdm

    from retrieval_service.clip_model import ClipSpec, load_clip, save_clip

    started = time.perf_counter()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    lr = lr if lr is not None else (FINETUNE_LR if pretrained else DEFAULT_LR)
    bundle = load_clip(ClipSpec(model_name, pretrained))
    model = bundle.model

    photos = catalogue.photos[catalogue.photos["has_image"].astype(bool)]
    with_images = len(photos)
    if max_photos is not None and with_images > max_photos:
        # Its own stream: a catalogue under the cap trains exactly as before there was one.
        sample = np.random.default_rng([seed, 1]).choice(with_images, max_photos, replace=False)
        photos = photos.iloc[np.sort(sample)]
    photo_idx = photos["photo_idx"].to_numpy(np.int64)
    pool = caption_pool(catalogue, photo_idx, min_confidence)
    usable = np.array([bool(k or d) for k, d in zip(pool.keywords, pool.descriptions)], bool)
    paths = [catalogue.image_path(pid) for pid in photos["photo_id"].astype(str)]
    images, decoded = load_image_tensor(paths, bundle.image_size, show_progress)
    usable &= decoded
    if usable.sum() < 4:
        raise ValueError(
            f"only {int(usable.sum())} photos have both a readable image and a caption: "
            "CLIP training needs images (run `imgsearch fetch-images` for a real catalogue)"
        )
    order = rng.permutation(np.flatnonzero(usable))
    n_heldout = max(1, int(round(len(order) * heldout_share))) if heldout_share > 0 else 0
    heldout, train = np.sort(order[:n_heldout]), np.sort(order[n_heldout:])
    all_tags = _all_tags(catalogue, photo_idx)
    eligible = [frozenset(words) for words in pool.keywords]

    mean, std = _normaliser(bundle)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(_param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.98))
    warmup = max(1, int(steps * warmup_share))

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return lr * 0.5 * (1 + math.cos(math.pi * progress))

    batch_size = min(batch_size, len(train))
    pad = max(1, bundle.image_size // 16)
    model.train()
    losses = []
    bar = tqdm(range(steps), desc="train clip", disable=not show_progress, file=sys.stderr)
    epoch_order = rng.permutation(train)
    cursor = 0
    for step in bar:
        if cursor + batch_size > len(epoch_order):
            epoch_order, cursor = rng.permutation(train), 0
        rows = epoch_order[cursor : cursor + batch_size]
        cursor += batch_size
        captions = [pool.sample(int(r), rng) for r in rows]
        positive = torch.from_numpy(_positives(captions, [eligible[r] for r in rows]))
        pixels = _augment(images[torch.from_numpy(rows)].float() / 255.0, generator, pad)
        tokens = bundle.tokenizer([text for text, _ in captions])
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        image_emb = model.encode_image((pixels - mean) / std, normalize=True)
        text_emb = model.encode_text(tokens, normalize=True)
        loss = _contrastive_loss(image_emb, text_emb, model.logit_scale, positive.float())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # as open_clip's training loop does
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    bar.close()
    model.eval()

    figures: dict = {}
    if len(heldout):
        heldout_pixels = (images[torch.from_numpy(heldout)].float() / 255.0 - mean) / std
        heldout_emb = np.concatenate(
            [
                bundle.encode_image_tensor(heldout_pixels[s : s + 256])
                for s in range(0, len(heldout), 256)
            ]
        )
        families, pair_of = query_families or ({}, None)
        figures = heldout_figures(
            bundle, heldout_emb, [all_tags[r] for r in heldout], families, pair_of
        )
    result = {
        "model_name": bundle.spec.model_name,
        "pretrained": pretrained,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "train_photos": int(len(train)),
        "heldout_photos": int(len(heldout)),
        **({"sampled_from": with_images} if len(photos) < with_images else {}),
        "skipped_images": int((~decoded).sum()),
        "final_loss": round(float(np.mean(losses[-20:])), 4) if losses else None,
        "seconds": round(time.perf_counter() - started, 1),
        "heldout": figures,
    }
    save_clip(bundle, out_dir, training=result)
    result["path"] = str(out_dir)
    if show_progress:
        print(
            f"trained {result['model_name']} for {steps} steps in {result['seconds']:.0f} s "
            f"(final loss {result['final_loss']}); {len(train)} train / {len(heldout)} "
            "held-out photos",
            file=sys.stderr,
        )
        if figures:
            print(format_figures(figures), file=sys.stderr)
    return result


def _all_tags(catalogue: Any, photo_idx: np.ndarray) -> list[set[str]]:
    """What evaluation counts as each photo's tags: its labels when the catalogue has them
    (what it shows), else every keyword at any confidence."""
    table, _ = catalogue.truth_tags()
    tags: dict[int, set[str]] = {}
    for idx, keyword in zip(table["photo_idx"].to_numpy(), table["keyword"].astype(str)):
        tags.setdefault(int(idx), set()).add(keyword)
    return [tags.get(int(i), set()) for i in photo_idx.tolist()]
