"""Contrastive CLIP training on a catalogue's images and captions, and the CLIP artifact build."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imgsearch.catalogue import normalise_keyword
from retrieval_service.clip_model import TRAIN_STEPS
from retrieval_service.semantic import KnownQueries, load_clip_retrievers

# ``imgsearch build`` calls build_clip_artifacts from here and the servers call
# load_clip_retrievers (defined with the retrievers it loads) from here too.
__all__ = ["build_clip_artifacts", "load_clip_retrievers", "train_clip"]

DEFAULT_LR = 1e-3  # from scratch (AdamW, batch 128)
FINETUNE_LR = 1e-5  # pretrained weights: small steps keep what pre-training learnt
MIN_CAPTION_CONFIDENCE = 0.4  # keywords below this are mostly a tagger's confusions
# Keywords whose query embeddings a build stores (the most frequent, on huge catalogues): at
# 512-d float32 that is 41 MB, and about a minute of ViT-B-32 encoding on two cores.
KNOWN_QUERIES_MAX = 20_000
HELDOUT_QUERIES = 256  # queries the runtime gate compares on
SENTENCE_SHARE = 0.3  # share of captions that are a full description rather than keywords
KEYWORDS_PER_CAPTION = (1, 2, 3)
KEYWORDS_PER_CAPTION_P = (0.4, 0.4, 0.2)
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
    keywords = keywords[keywords["confidence"] >= min_confidence]
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


def heldout_figures(
    bundle: Any,
    image_emb: np.ndarray,
    photo_keywords: list[set[str]],
    families: dict[str, list[str]],
    pair_of: tuple[str, str] | None,
    k: int = 10,
) -> dict:
    """Tag precision@k of text-to-image retrieval among held-out photos, per query family.

    A retrieved photo counts when it is tagged with every keyword of the query (its labels when
    the catalogue has them, else its keywords at any confidence, as ``imgsearch eval``'s
    ``tag_p@10``). ``ceiling`` is the best reachable figure: a query
    with fewer than ``k`` relevant held-out photos cannot reach 1.

    Returns
    -------
    dict
        Per family: ``{"p@10", "ceiling", "queries"}``; pairs under ``"<a>+<b>"``.
    """
    queries: dict[str, list[tuple[str, tuple[str, ...]]]] = {}
    if families:
        for family, words in families.items():
            queries[family] = [(w, (w,)) for w in words]
        if pair_of:
            first, second = pair_of
            queries[f"{first}+{second}"] = [
                (f"{a} {b}", (a, b)) for a in families[first] for b in families[second]
            ]
    else:
        counts: dict[str, int] = {}
        pair_counts: dict[tuple[str, str], int] = {}
        for tags in photo_keywords:
            ordered = sorted(tags)
            for a in ordered:
                counts[a] = counts.get(a, 0) + 1
            for x in range(len(ordered)):
                for y in range(x + 1, len(ordered)):
                    key = (ordered[x], ordered[y])
                    pair_counts[key] = pair_counts.get(key, 0) + 1
        top = sorted(counts, key=lambda w: (-counts[w], w))[:50]
        top_pairs = sorted(pair_counts, key=lambda p: (-pair_counts[p], p))[:50]
        queries["keyword"] = [(w, (w,)) for w in top]
        queries["pair"] = [(f"{a} {b}", (a, b)) for a, b in top_pairs]
    figures = {}
    k = min(k, len(image_emb))
    for family, items in queries.items():
        relevant_counts = [
            sum(all(w in t for w in need) for t in photo_keywords) for _, need in items
        ]
        items = [item for item, n in zip(items, relevant_counts) if n > 0]
        relevant_counts = [n for n in relevant_counts if n > 0]
        if not items or k == 0:
            continue
        text_emb = bundle.encode_text([text for text, _ in items])
        top = np.argsort(-(text_emb @ image_emb.T), axis=1, kind="stable")[:, :k]
        precision = [
            np.mean([all(w in photo_keywords[r] for w in need) for r in rows])
            for (_, need), rows in zip(items, top)
        ]
        figures[family] = {
            f"p@{k}": round(float(np.mean(precision)), 4),
            "ceiling": round(float(np.mean([min(1.0, n / k) for n in relevant_counts])), 4),
            "queries": len(items),
        }
    return figures


def format_figures(figures: dict) -> str:
    """The held-out figures as a small table."""
    lines = [f"{'held-out queries':<18} {'tag P@10':>9} {'ceiling':>8} {'queries':>8}"]
    for family, row in figures.items():
        p_key = next(key for key in row if key.startswith("p@"))
        lines.append(f"{family:<18} {row[p_key]:>9.3f} {row['ceiling']:>8.3f} {row['queries']:>8}")
    return "\n".join(lines)


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
) -> dict:
    """Train (or fine-tune) a CLIP on the catalogue's images and captions, and save it.

    Captions mix full sentences (the photo's descriptions) with 1-3 keyword subsets of its
    keywords ("red", "red circle", "circle night"), so bare-keyword queries work. The loss is
    CLIP's symmetric InfoNCE with open_clip's learnable logit scale, with every true pair of the
    batch as a target (see :func:`_positives`). A fixed number of AdamW steps with warm-up and
    cosine decay keeps runs deterministic for a seed. About 10% of photos are held out and
    the held-out retrieval figure is printed at the end.

    Images are decoded once into memory at the model's input size: 5,000 demo photos at 64 px
    take 61 MB; fine-tuning a 224 px model on 25k photos takes 3.8 GB.

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

    Returns
    -------
    dict
        ``model_name``, ``pretrained``, ``steps``, ``batch_size``, ``lr``, ``seed``,
        ``train_photos``, ``heldout_photos``, ``skipped_images``, ``final_loss``, ``seconds``,
        ``heldout`` (per-family figures, see :func:`heldout_figures`), ``path`` and
        ``threads``.
    """
    from imgsearch.cpu import torch_threads

    with torch_threads(threads) as used_threads:
        result = _train_clip(
            catalogue, out_dir, model_name, pretrained, steps, batch_size, lr, seed,
            show_progress, heldout_share, weight_decay, warmup_share, min_confidence,
            query_families,
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


def keyword_vocabulary(catalogue: Any, max_keywords: int = KNOWN_QUERIES_MAX) -> list[str]:
    """The catalogue's most frequent keywords, normalised and distinct (ties by name).

    Both the photos' keywords (``keywords.tsv``) and what users searched (the conversions'
    ``keyword``, e.g. "red circle") count: either is a query the servers will see again.
    """
    import pandas as pd

    words = [catalogue.keywords["keyword"]]
    conversions = catalogue.conversions
    if conversions is not None and "keyword" in conversions:
        words.append(conversions["keyword"])
    counts = pd.concat(words).astype(str).map(normalise_keyword).value_counts()
    frame = counts.rename_axis("keyword").reset_index(name="count")
    frame = frame[frame["keyword"] != ""]
    frame = frame.sort_values(["count", "keyword"], ascending=[False, True], kind="stable")
    return frame["keyword"].head(max_keywords).tolist()


def heldout_queries(
    catalogue: Any, known: set[str], n: int = HELDOUT_QUERIES, seed: int = 0
) -> list[str]:
    """Queries the encoder will really see: none of them is a stored keyword.

    Half are two keywords of one photo ("red circle"), half the photos' descriptions (longer
    sentences), drawn with a fixed seed; either kind fills in when the other runs short.
    """
    rng = np.random.default_rng(seed)
    keywords = catalogue.keywords[["photo_idx", "keyword"]].astype({"keyword": str})
    pairs: list[str] = []
    for _, words in keywords.groupby("photo_idx", sort=True)["keyword"]:
        words = sorted({normalise_keyword(w) for w in words} - {""})
        if len(words) >= 2:
            a, b = rng.choice(len(words), size=2, replace=False)
            pairs.append(f"{words[a]} {words[b]}")
    texts = [
        normalise_keyword(t)
        for column in ("photo_description", "ai_description")
        if column in catalogue.photos
        for t in catalogue.photos[column].fillna("").astype(str)
    ]
    pools = []
    for pool in (pairs, texts):
        distinct = [q for q in dict.fromkeys(pool) if q and q != "nan" and q not in known]
        pools.append([distinct[i] for i in rng.permutation(len(distinct))])
    half = n // 2
    first = pools[0][:half]
    second = pools[1][: n - len(first)]
    first += pools[0][half : half + n - len(first) - len(second)]
    return first + second


def build_text_runtimes(
    bundle: Any,
    clip_dir: Path,
    queries: list[str],
    image_embeddings: np.ndarray,
    show_progress: bool = True,
) -> Any:
    """Build the candidate text runtimes, run the gate, keep the chosen one's files.

    Candidates: torch FP32 (the reference; over real tokens when the tower is causal), torch
    INT8, and, when ONNX Runtime is installed and the tower is causal, ONNX FP32 and dynamic
    INT8 exported into ``clip_dir``. ``.onnx`` files of runtimes not chosen are deleted.

    Returns
    -------
    ~retrieval_service.quantization.RuntimeChoice
    """
    from retrieval_service.quantization import quantize_text_encoder, select_text_runtime
    from retrieval_service.text_encoder import (
        ONNX_FILES,
        ONNX_FP32,
        ONNX_INT8,
        TORCH_INT8,
        OnnxTextEncoder,
        TorchTextEncoder,
        causal_text_tower,
        export_text_onnx,
        onnx_available,
    )

    reference = TorchTextEncoder(bundle.model, bundle.tokenizer, bundle.embed_dim)
    int8_model = quantize_text_encoder(bundle.model)
    candidates = {
        TORCH_INT8: TorchTextEncoder(int8_model, bundle.tokenizer, bundle.embed_dim, TORCH_INT8)
    }
    tower, why_not = causal_text_tower(bundle.model)
    why_not = why_not or onnx_available()
    if not why_not:
        fp32_path = clip_dir / ONNX_FILES[ONNX_FP32]
        int8_path = clip_dir / ONNX_FILES[ONNX_INT8]
        export_text_onnx(bundle.model, fp32_path, int8_path)
        for runtime, path in ((ONNX_FP32, fp32_path), (ONNX_INT8, int8_path)):
            candidates[runtime] = OnnxTextEncoder(
                path, bundle.tokenizer, bundle.embed_dim, tower.pool_type, tower.eos_id, runtime
            )
    elif show_progress:
        print(f"ONNX Runtime not tried: {why_not}", file=sys.stderr)
    choice = select_text_runtime(reference, candidates, queries, image_embeddings)
    for runtime, name in ONNX_FILES.items():
        if runtime != choice.runtime:
            (clip_dir / name).unlink(missing_ok=True)
    return choice


def build_clip_artifacts(
    catalogue: Any,
    set_dir: str | Path,
    clip_spec: Any | None = None,
    factory: str | None = None,
    train_steps: int = TRAIN_STEPS,
    show_progress: bool = True,
    seed: int = 0,
    query_families: QueryFamilies | None = None,
    embeddings: str | Path | None = None,
) -> dict:
    """Write the CLIP part of an artifact set: model, embeddings, index, text runtime, keywords.

    Parameters
    ----------
    catalogue:
        The catalogue being built.
    set_dir:
        The artifact set's folder; ``clip/``, ``image_embeddings.npz``, ``vector.faiss`` and
        ``vector.json`` are written there.
    clip_spec:
        A :class:`~retrieval_service.clip_model.ClipSpec` to use as is (a local checkpoint is
        copied into the set; a hub tag is recorded by name and loaded from open_clip's cache).
        None trains the tiny CLIP on the catalogue for ``train_steps`` steps.
    factory:
        FAISS factory string; by catalogue size when None (see ``default_factory``).
    train_steps:
        Training steps when a CLIP is trained.
    show_progress:
        Progress bars and printed figures.
    seed:
        Training seed.
    query_families:
        Query families of the held-out figure when CLIP is trained (see :func:`train_clip`).
    embeddings:
        Image embeddings made beforehand by ``clip_spec`` (``imgsearch embed``, with or
        without ``--ray``): checked against the catalogue and the CLIP's weights and used
        instead of embedding the images here.

    Returns
    -------
    dict
        Figures for the manifest: ``clip`` (spec, training figures), ``embedding`` (counts,
        images/s), ``vector_index`` (factory, size, recall@10 vs exact), ``known_queries``
        (keywords whose query embeddings are stored in ``clip/keyword_embeddings.npz``),
        ``text_runtime`` (the gate's figures and choice, also in ``clip/clip.json``).
        ``{"skipped": reason}`` when no photo has an image (nothing written).

    Raises
    ------
    ~retrieval_service.embedding.EmbeddingMismatch
        When ``embeddings`` do not fit the catalogue or were made by other weights.
    """
    from imgsearch.artifacts import CLIP_DIR, EMBEDDINGS, VECTOR_INDEX
    from retrieval_service.clip_model import (
        KEYWORD_EMBEDDINGS,
        ClipSpec,
        load_clip,
        save_clip,
        save_clip_reference,
        update_clip_json,
    )
    from retrieval_service.embedding import embed_catalogue, import_embeddings, load_embeddings
    from retrieval_service.index_calibration import calibrate
    from retrieval_service.text_encoder import TorchTextEncoder
    from retrieval_service.vector_index import VectorIndex

    set_dir = Path(set_dir)
    clip_dir = set_dir / CLIP_DIR
    n_images = int(catalogue.photos["has_image"].astype(bool).sum())
    if n_images == 0:
        return {"skipped": "no photo has an image; CLIP retrieval is not built"}
    if embeddings is not None and clip_spec is None:
        raise ValueError("precomputed embeddings need the spec of the CLIP that made them")
    figures: dict = {}
    if clip_spec is None:
        training = train_clip(
            catalogue,
            clip_dir,
            steps=train_steps,
            seed=seed,
            show_progress=show_progress,
            query_families=query_families,
        )
        bundle = load_clip(ClipSpec.from_dir(clip_dir))
        figures["clip"] = {"model_name": training["model_name"], "trained": training}
    else:
        bundle = load_clip(clip_spec)
        local = clip_spec.pretrained and Path(clip_spec.pretrained).exists()
        if local or not clip_spec.pretrained:
            save_clip(bundle, clip_dir)
        else:
            save_clip_reference(clip_spec, clip_dir)
        figures["clip"] = {"model_name": clip_spec.model_name, "pretrained": clip_spec.pretrained}

    if embeddings is None:
        figures["embedding"] = embed_catalogue(
            bundle, catalogue, set_dir / EMBEDDINGS, show_progress=show_progress
        )
    else:
        figures["embedding"] = import_embeddings(
            embeddings, bundle, catalogue, set_dir / EMBEDDINGS
        )
    photo_idx, embeddings = load_embeddings(set_dir / EMBEDDINGS)
    vector_index = VectorIndex.build(embeddings, photo_idx, factory=factory, seed=seed)
    vocabulary = keyword_vocabulary(catalogue)
    started = time.perf_counter()
    reference = TorchTextEncoder(bundle.model, bundle.tokenizer, bundle.embed_dim)
    known = KnownQueries(vocabulary, reference.encode_text(vocabulary))
    known.save(clip_dir / KEYWORD_EMBEDDINGS)
    figures["known_queries"] = {
        "keywords": len(known),
        "seconds": round(time.perf_counter() - started, 1),
        "real_tokens": reference.real_tokens,
    }
    sample = vocabulary[:8] + heldout_queries(catalogue, set(vocabulary), 8, seed=seed + 1)
    if reference.real_tokens and sample:
        # The real-token forward must equal open_clip's encode_text over the padded context.
        diff = float(np.abs(reference.encode_text(sample) - bundle.encode_text(sample)).max())
        figures["known_queries"]["real_token_max_abs_diff"] = diff
        if diff > 1e-4:
            raise RuntimeError(f"real-token text encoding differs from encode_text by {diff}")
    # Held-out queries (else the keywords) gate the text runtime; with the keywords, they tune
    # the index's search effort (half of each kind) and measure it (the other half).
    queries = heldout_queries(catalogue, set(vocabulary), seed=seed) or vocabulary[:HELDOUT_QUERIES]
    families = {"keyword": known.embeddings, "held-out": reference.encode_text(queries)}
    calibration = calibrate(vector_index, embeddings, families, seed=seed)
    vector_index.save(set_dir / VECTOR_INDEX, row_map=f"{EMBEDDINGS}:photo_idx")
    figures["vector_index"] = {
        "factory": vector_index.factory,
        "ntotal": vector_index.ntotal,
        "dim": vector_index.dim,
        "params": vector_index.params,
        "recall@10_vs_exact": (recall := calibration.pop("unseen_recall")),
        "calibration": calibration,
    }
    choice = build_text_runtimes(bundle, clip_dir, queries, embeddings, show_progress)
    update_clip_json(clip_dir, text_encoder=choice.runtime, text_runtime=choice.as_dict())
    figures["text_runtime"] = choice.as_dict()
    if show_progress:
        print(
            f"vector index {vector_index.factory}: {vector_index.ntotal:,} x {vector_index.dim}, "
            f"recall@10 vs exact {recall:.3f}; {len(known):,} keywords' query embeddings stored",
            file=sys.stderr,
        )
        print(choice.summary(), file=sys.stderr)
    return figures
