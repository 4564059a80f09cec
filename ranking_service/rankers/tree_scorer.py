"""A LightGBM model's raw scores in a few numpy calls, without a branch per tree node.

LightGBM walks each row down each tree, a data-dependent branch per node: on the hundred
candidates of one ranking request the branches mispredict and the walk costs about 2–3 µs a
row. :class:`TreeScorer` evaluates the same trees the QuickScorer way (Lucchese et al., SIGIR
2015): a node whose test fails (``x > threshold``) rules out the leaves of its left subtree,
and the leaf a row exits at is the leftmost one no failed node ruled out. Per feature, the
nodes that test it are sorted by threshold, so the nodes a value fails are a prefix of that
list; the AND of their masks is precomputed for every prefix. A request is then one
``searchsorted`` per feature, one gather of the prefix masks, an AND across features, the
lowest set bit per tree, and the trees' leaf values summed in LightGBM's order: the same
doubles.

Missing values follow LightGBM's rule per node (``Tree::NumericalDecision``): with missing
type ``None`` a NaN counts as 0; with ``NaN`` a NaN, and with ``Zero`` a NaN or a value within
``1e-35`` of 0, goes the node's default way. A model this does not cover (categorical splits,
linear trees, more than 64 leaves, one feature under two missing types, more than one tree
per iteration) is refused with :class:`UnsupportedModel`, and the caller keeps LightGBM.
"""

from __future__ import annotations

import numpy as np

# LightGBM's decision_type bits (tree.h): categorical, default left, missing type (2 bits).
_CATEGORICAL, _DEFAULT_LEFT = 1, 2
_MISSING_NONE, _MISSING_ZERO, _MISSING_NAN = 0, 1, 2
# LightGBM's kZeroThreshold: a float, compared as a double.
ZERO_THRESHOLD = float(np.float32(1e-35))
# De Bruijn sequence for the index of a 64-bit word's lowest set bit.
_DE_BRUIJN = np.uint64(0x03F79D71B4CB0A89)
_DE_BRUIJN_INDEX = np.zeros(64, dtype=np.int64)
_DE_BRUIJN_INDEX[
    ((np.uint64(1) << np.arange(64, dtype=np.uint64)) * _DE_BRUIJN) >> np.uint64(58)
] = np.arange(64)


class UnsupportedModel(ValueError):
    """A LightGBM model :class:`TreeScorer` does not evaluate (the message says why)."""


def parse_trees(model: str) -> tuple[int, list[dict[str, np.ndarray]]]:
    """The feature count and per-tree arrays of a LightGBM text model (``model_to_string``).

    Raises
    ------
    UnsupportedModel
        For what :class:`TreeScorer` does not evaluate.
    """
    header, _, body = model.partition("\nTree=")
    fields = dict(line.split("=", 1) for line in header.splitlines() if "=" in line)
    if int(fields.get("num_tree_per_iteration", 1)) != 1:
        raise UnsupportedModel("more than one tree per iteration")
    n_features = int(fields["max_feature_idx"]) + 1
    trees = []
    for block in ("Tree=" + body).split("\nTree=") if body else []:
        block = block.split("\nend of trees")[0]
        values = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
        if int(values.get("num_cat", 0)) or int(values.get("is_linear", 0)):
            raise UnsupportedModel("categorical splits or linear trees")
        leaves = int(values["num_leaves"])
        tree = {"leaf_value": np.array(values["leaf_value"].split(), dtype=np.float64)}
        if leaves > 1:
            for key, dtype in (
                ("split_feature", np.int64),
                ("threshold", np.float64),
                ("decision_type", np.int64),
                ("left_child", np.int64),
                ("right_child", np.int64),
            ):
                tree[key] = np.array(values[key].split(), dtype=dtype)
            if np.any(tree["decision_type"] & _CATEGORICAL):
                raise UnsupportedModel("categorical splits")
        if leaves > 64:
            raise UnsupportedModel(f"a tree of {leaves} leaves (at most 64)")
        trees.append(tree)
    return n_features, trees


def _leaf_order(tree: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[int, int]]:
    """The tree's leaves left to right, and per internal node the bit mask of the leaves of
    its left subtree (bit ``i``: the ``i``-th leaf from the left)."""
    order: list[int] = []
    left_bits: dict[int, int] = {}

    def walk(node: int) -> int:
        """Visit ``node``; return the bits of its leaves."""
        if node < 0:
            order.append(~node)
            return 1 << (len(order) - 1)
        left = walk(int(tree["left_child"][node]))
        left_bits[node] = left
        return left | walk(int(tree["right_child"][node]))

    if "split_feature" in tree:
        walk(0)
    else:
        order.append(0)
    return np.asarray(order, dtype=np.int64), left_bits


class TreeScorer:
    """A LightGBM model's raw scores (``Booster.predict(raw_score=True)``), QuickScorer-style.

    Parameters
    ----------
    model:
        The model's text (``Booster.model_to_string()``).

    Raises
    ------
    UnsupportedModel
        For a model it does not evaluate (module docstring).
    """

    def __init__(self, model: str) -> None:
        self.n_features, trees = parse_trees(model)
        n_trees = len(trees)
        self.n_trees = n_trees
        width = max((len(t["leaf_value"]) for t in trees), default=1)
        # The narrowest word that holds a bit per leaf: a request gathers features × rows ×
        # trees of them.
        self.word = np.uint16 if width <= 16 else np.uint32 if width <= 32 else np.uint64
        every = self.word(np.iinfo(self.word).max)
        # Per tree: its leaf values left to right (padded to ``width``), flat.
        self.leaf_values = np.zeros((n_trees, width), dtype=np.float64)
        nodes: list[list[tuple[float, int, int, bool]]] = [[] for _ in range(self.n_features)]
        missing: list[set[int]] = [set() for _ in range(self.n_features)]
        for t, tree in enumerate(trees):
            order, left_bits = _leaf_order(tree)
            self.leaf_values[t, : len(order)] = tree["leaf_value"][order]
            for node, bits in left_bits.items():
                feature = int(tree["split_feature"][node])
                decision = int(tree["decision_type"][node])
                missing[feature].add((decision >> 2) & 3)
                nodes[feature].append(
                    (float(tree["threshold"][node]), t, bits, bool(decision & _DEFAULT_LEFT))
                )
        # Per feature: thresholds sorted; row p of its block ANDs the masks of its first p
        # nodes (those a value above their threshold fails); a last row for the values that
        # go each node's default way (NaN, or zero under missing type Zero).
        self.thresholds: list[np.ndarray] = []
        self.missing = np.zeros(self.n_features, dtype=np.int64)
        self.offsets = np.zeros(self.n_features, dtype=np.int64)
        blocks = []
        start = 0
        for feature in range(self.n_features):
            kinds = missing[feature] or {_MISSING_NONE}
            if len(kinds) > 1:
                raise UnsupportedModel(f"feature {feature} split under two missing types")
            self.missing[feature] = kinds.pop()
            split = sorted(nodes[feature], key=lambda node: node[0])
            block = np.full((len(split) + 2, n_trees), every, dtype=self.word)
            for p, (_, t, bits, _) in enumerate(split):
                block[p + 1 : -1, t] &= ~self.word(bits)
            for _, t, bits, default_left in split:
                if not default_left:
                    block[-1, t] &= ~self.word(bits)
            self.thresholds.append(np.asarray([node[0] for node in split], dtype=np.float64))
            self.offsets[feature] = start
            start += len(block)
            blocks.append(block)
        self.masks = np.concatenate(blocks) if blocks else np.zeros((0, n_trees), self.word)
        # Every threshold of every feature in one sorted array: the count of them below a
        # value (one searchsorted for all the features of all the rows) gives, through a
        # table per feature, the count of that feature's thresholds below it, i.e. the row of
        # its block to read.
        self._cuts = np.unique(np.concatenate([np.zeros(0), *self.thresholds]))
        self._rows = np.empty((self.n_features, len(self._cuts) + 1), dtype=np.int64)
        for feature, thresholds in enumerate(self.thresholds):
            below = np.searchsorted(thresholds, self._cuts, side="left")
            self._rows[feature] = self.offsets[feature] + np.r_[below, len(thresholds)]
        self._rows = self._rows.ravel()
        self._row_base = (np.arange(self.n_features, dtype=np.int64) * (len(self._cuts) + 1))[
            :, None
        ]
        self._default_rows = (
            self.offsets + np.asarray([len(t) + 1 for t in self.thresholds], dtype=np.int64)
        )[:, None]
        # Column vectors over the features, broadcast against a request's features × rows.
        kind = self.missing[:, None]
        self._default_nan = kind != _MISSING_NONE
        self._default_zero = kind == _MISSING_ZERO
        self._flat_leaf = (np.arange(n_trees, dtype=np.int64) * width)[:, None]
        self._values = self.leaf_values.ravel()
        self._lowest = _lowest_bit_table() if self.word is np.uint16 else None

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Raw scores of ``features`` (features × rows, float64), as LightGBM computes them."""
        n_rows = features.shape[1]
        if self.n_trees == 0:
            return np.zeros(n_rows)
        # LightGBM reads a value within 1e-35 of 0 as 0, and keeps NaN (Predictor's rows).
        values = np.where(np.abs(features) <= ZERO_THRESHOLD, 0.0, features)
        nan = np.isnan(values)
        # Missing type None: NaN counts as 0. NaN: a NaN goes the default way. Zero: NaN and 0
        # go the default way.
        default = nan & self._default_nan | (values == 0.0) & self._default_zero
        values[nan] = 0.0  # the default rows stand for the others
        # Per value, the thresholds of its feature strictly below it: the nodes it fails.
        below = self._cuts.searchsorted(values, side="left")
        index = np.where(default, self._default_rows, self._rows.take(below + self._row_base))
        alive = np.bitwise_and.reduce(self.masks.take(index, axis=0), axis=0).T  # trees × rows
        if self._lowest is not None:
            leaf = self._lowest.take(alive)
        else:
            words = alive.astype(np.uint64)
            lowest = words & (~words + np.uint64(1))
            leaf = _DE_BRUIJN_INDEX[(lowest * _DE_BRUIJN) >> np.uint64(58)]
        # Summed tree after tree, as LightGBM adds them: a reduction over the outer axis
        # adds whole rows in order (the same rounding).
        return np.add.reduce(self._values.take(leaf + self._flat_leaf), axis=0)


def _lowest_bit_table() -> np.ndarray:
    """Per 16-bit word, the index of its lowest set bit (0 for the word 0, never looked up)."""
    words = np.arange(1 << 16, dtype=np.int64)
    lowest = words & -words
    table = np.zeros(1 << 16, dtype=np.uint8)
    table[1:] = np.log2(lowest[1:]).astype(np.uint8)
    return table
