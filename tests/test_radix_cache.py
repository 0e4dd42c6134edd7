"""Tests for backend.radix_cache: unit tests plus a stateful model test against a real KVPool."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from backend.kv_pool import KVPool
from backend.radix_cache import MatchResult, RadixCache, TreeNode


def t(*xs: int) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.int64)


class FreeLog:
    """free_slots callback that records every slot the cache hands back."""

    def __init__(self) -> None:
        self.freed: list[int] = []

    def __call__(self, slots: torch.Tensor) -> None:
        assert slots.dtype == torch.int64
        self.freed.extend(slots.tolist())


def path_key(cache: RadixCache, node: TreeNode) -> tuple[int, ...]:
    """Token ids spelled by the path from the root to ``node``."""
    parts = []
    while node is not cache.root:
        parts.append(node.key)
        assert node.parent is not None, "node is detached from the tree"
        node = node.parent
    return tuple(tok for part in reversed(parts) for tok in part)


def tree_items(cache: RadixCache) -> dict[tuple[int, ...], int]:
    """Every cached prefix -> slot of its last token, by walking the tree."""
    out: dict[tuple[int, ...], int] = {}
    stack: list[tuple[TreeNode, tuple[int, ...]]] = [(cache.root, ())]
    while stack:
        node, prefix = stack.pop()
        for child in node.children.values():
            p = prefix
            for tok, slot in zip(child.key, child.value.tolist(), strict=True):
                p = (*p, tok)
                out[p] = slot
            stack.append((child, p))
    return out


def leaves(cache: RadixCache) -> list[TreeNode]:
    out, stack = [], [cache.root]
    while stack:
        node = stack.pop()
        if node is not cache.root and not node.children:
            out.append(node)
        stack.extend(node.children.values())
    return out


# ------------------------------------------------------------------ unit tests


def test_empty_cache_matches_nothing() -> None:
    cache = RadixCache(FreeLog())
    m = cache.match_prefix([1, 2, 3])
    assert isinstance(m, MatchResult)
    assert m.slots.dtype == torch.int64 and m.slots.numel() == 0
    assert m.last_node is cache.root
    assert cache.total_size == 0
    cache.check_invariants()


def test_exact_match_and_longer_query() -> None:
    cache = RadixCache(FreeLog())
    assert cache.insert([1, 2, 3], t(10, 11, 12)) == 0
    m = cache.match_prefix([1, 2, 3])
    assert m.slots.tolist() == [10, 11, 12]
    assert path_key(cache, m.last_node) == (1, 2, 3)
    m = cache.match_prefix([1, 2, 3, 4, 5])
    assert m.slots.tolist() == [10, 11, 12]
    assert path_key(cache, m.last_node) == (1, 2, 3)
    assert cache.match_prefix([2, 1]).slots.numel() == 0
    assert cache.evictable_size == 3 and cache.protected_size == 0 and cache.total_size == 3
    cache.check_invariants()


def test_match_returns_a_copy() -> None:
    cache = RadixCache(FreeLog())
    cache.insert([1, 2], t(5, 6))
    m = cache.match_prefix([1, 2])
    m.slots[0] = 99
    assert cache.match_prefix([1, 2]).slots.tolist() == [5, 6]


def test_insert_copies_slots() -> None:
    cache = RadixCache(FreeLog())
    slots = t(5, 6, 7)
    cache.insert([1, 2, 3], slots)
    slots[:] = 0  # the caller reusing its buffer must not corrupt the tree
    assert cache.match_prefix([1, 2, 3]).slots.tolist() == [5, 6, 7]


def test_partial_match_splits_edge() -> None:
    cache = RadixCache(FreeLog())
    cache.insert([1, 2, 3, 4, 5], t(10, 11, 12, 13, 14))
    assert len(cache.root.children) == 1
    m = cache.match_prefix([1, 2, 9])
    assert m.slots.tolist() == [10, 11]
    upper = m.last_node
    assert upper.key == (1, 2) and upper.value.tolist() == [10, 11]
    assert upper.parent is cache.root and cache.root.children[1] is upper
    assert list(upper.children) == [3]
    lower = upper.children[3]
    assert lower.key == (3, 4, 5) and lower.value.tolist() == [12, 13, 14]
    assert lower.parent is upper
    # The whole key is still matched through both halves.
    assert cache.match_prefix([1, 2, 3, 4, 5]).slots.tolist() == [10, 11, 12, 13, 14]
    assert cache.total_size == 5 and cache.evictable_size == 5
    cache.check_invariants()


def test_match_ending_at_node_boundary_does_not_split() -> None:
    cache = RadixCache(FreeLog())
    cache.insert([1, 2, 3], t(1, 2, 3))
    node = cache.match_prefix([1, 2, 3]).last_node
    assert cache.match_prefix([1, 2, 3, 7]).last_node is node
    assert node.parent is cache.root and not node.children


def test_insert_returns_already_present_length() -> None:
    cache = RadixCache(FreeLog())
    assert cache.insert([1, 2, 3], t(10, 11, 12)) == 0
    assert cache.insert([1, 2, 3, 4, 5], t(20, 21, 22, 23, 24)) == 3
    # The tree keeps its own slots for the shared prefix and takes the new tail.
    assert cache.match_prefix([1, 2, 3, 4, 5]).slots.tolist() == [10, 11, 12, 23, 24]
    assert cache.insert([1, 2, 3, 4, 5], t(30, 31, 32, 33, 34)) == 5
    assert cache.match_prefix([1, 2, 3, 4, 5]).slots.tolist() == [10, 11, 12, 23, 24]
    assert cache.total_size == 5
    cache.check_invariants()


def test_insert_prefix_of_existing_edge_stores_nothing() -> None:
    cache = RadixCache(FreeLog())
    cache.insert([1, 2, 3, 4], t(10, 11, 12, 13))
    assert cache.insert([1, 2], t(50, 51)) == 2
    assert cache.total_size == 4
    assert cache.match_prefix([1, 2]).slots.tolist() == [10, 11]
    cache.check_invariants()


def test_insert_diverging_mid_edge() -> None:
    cache = RadixCache(FreeLog())
    cache.insert([1, 2, 3, 4], t(10, 11, 12, 13))
    assert cache.insert([1, 2, 7, 8, 9], t(20, 21, 22, 23, 24)) == 2
    shared = cache.root.children[1]
    assert shared.key == (1, 2) and shared.value.tolist() == [10, 11]
    assert sorted(shared.children) == [3, 7]
    assert shared.children[3].key == (3, 4) and shared.children[3].value.tolist() == [12, 13]
    assert shared.children[7].key == (7, 8, 9)
    assert shared.children[7].value.tolist() == [22, 23, 24]
    assert cache.match_prefix([1, 2, 3, 4]).slots.tolist() == [10, 11, 12, 13]
    assert cache.match_prefix([1, 2, 7, 8, 9]).slots.tolist() == [10, 11, 22, 23, 24]
    assert cache.total_size == 7 and cache.evictable_size == 7
    cache.check_invariants()


def test_long_keys_diverging_at_every_offset() -> None:
    """Exercises the chunked common-prefix search across chunk boundaries."""
    base = list(range(1000, 1300))
    for cut in (0, 1, 63, 64, 65, 127, 128, 200, 299):
        cache = RadixCache(FreeLog())
        cache.insert(base, torch.arange(300, dtype=torch.int64))
        other = [*base[:cut], -1, *base[cut + 1 :]]
        assert cache.insert(other, torch.arange(1000, 1300, dtype=torch.int64)) == cut
        m = cache.match_prefix([*base[:cut], -5])
        assert m.slots.tolist() == list(range(cut))
        cache.check_invariants()


def test_tensor_and_tuple_keys() -> None:
    cache = RadixCache(FreeLog())
    cache.insert(torch.tensor([4, 5, 6]), t(1, 2, 3))
    assert cache.match_prefix((4, 5)).slots.tolist() == [1, 2]
    assert cache.insert([4, 5, 6], t(7, 8, 9)) == 3


def test_insert_length_mismatch_raises() -> None:
    cache = RadixCache(FreeLog())
    with pytest.raises(ValueError):
        cache.insert([1, 2, 3], t(1, 2))
    assert cache.insert([], t()) == 0


def test_lock_unlock_moves_counts() -> None:
    cache = RadixCache(FreeLog())
    cache.insert([1, 2, 3, 4], t(1, 2, 3, 4))
    cache.insert([1, 2, 5], t(1, 2, 5))  # shared (1,2), leaves (3,4) and (5,)
    leaf = cache.match_prefix([1, 2, 3, 4]).last_node
    assert cache.evictable_size == 5 and cache.protected_size == 0
    cache.inc_lock_ref(leaf)
    assert cache.evictable_size == 1 and cache.protected_size == 4
    assert leaf.lock_ref == 1 and leaf.parent is not None and leaf.parent.lock_ref == 1
    cache.check_invariants()
    cache.inc_lock_ref(leaf)  # second lock: counts do not move again
    assert cache.evictable_size == 1 and cache.protected_size == 4
    cache.dec_lock_ref(leaf)
    assert cache.evictable_size == 1 and cache.protected_size == 4
    cache.dec_lock_ref(leaf)
    assert cache.evictable_size == 5 and cache.protected_size == 0
    cache.check_invariants()
    with pytest.raises(AssertionError):
        cache.dec_lock_ref(leaf)
    cache.inc_lock_ref(cache.root)  # locking the root is a no-op
    assert cache.protected_size == 0


def test_locked_node_survives_split() -> None:
    cache = RadixCache(FreeLog())
    cache.insert([1, 2, 3, 4], t(1, 2, 3, 4))
    node = cache.match_prefix([1, 2, 3, 4]).last_node
    cache.inc_lock_ref(node)
    upper = cache.match_prefix([1, 2]).last_node  # splits the locked node
    assert upper is not node and node.parent is upper
    assert upper.lock_ref == 1 and cache.protected_size == 4
    assert path_key(cache, node) == (1, 2, 3, 4)
    cache.check_invariants()
    cache.dec_lock_ref(node)
    assert upper.lock_ref == 0 and cache.protected_size == 0 and cache.evictable_size == 4
    cache.check_invariants()


def test_evict_is_lru_among_unlocked_leaves() -> None:
    log = FreeLog()
    cache = RadixCache(log)
    cache.insert([1, 1], t(1, 2))
    cache.insert([2, 2], t(3, 4))
    cache.insert([3, 3], t(5, 6))
    cache.match_prefix([1, 1])  # [2, 2] is now least recently used, then [3, 3]
    assert cache.evict(1) == 2
    assert log.freed == [3, 4]
    assert cache.match_prefix([2, 2]).slots.numel() == 0
    assert cache.evict(2) == 2
    assert log.freed == [3, 4, 5, 6]
    assert cache.match_prefix([1, 1]).slots.tolist() == [1, 2]
    cache.check_invariants()


def test_eviction_heap_stays_small_and_in_lru_order_across_lock_cycles() -> None:
    """Locking and unlocking a leaf pushes a heap entry each time; dropped and stale
    entries are compacted away, and evictions still come oldest first."""
    log = FreeLog()
    cache = RadixCache(log)
    for i in range(10):
        cache.insert([i, i], t(2 * i, 2 * i + 1))
    hot = cache.match_prefix([9, 9]).last_node
    for _ in range(500):
        cache.inc_lock_ref(hot)
        cache.dec_lock_ref(hot)
        assert len(cache._lru) <= 2 * 10 + 64 + 1
    cache.match_prefix([0, 0])  # leaves 1..8 are now the oldest, in insertion order
    cache.check_invariants()
    assert cache.evict(6) == 6
    assert log.freed == [2, 3, 4, 5, 6, 7]
    assert cache.evict(20) == 14
    assert log.freed[6:] == [8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 0, 1]
    cache.check_invariants()


def test_evict_frees_whole_leaves_until_enough() -> None:
    log = FreeLog()
    cache = RadixCache(log)
    cache.insert([1, 2, 3], t(1, 2, 3))
    cache.insert([4, 5], t(4, 5))
    assert cache.evict(0) == 0
    assert cache.evict(1) == 3  # a whole leaf goes, even if more than asked
    assert sorted(log.freed) == [1, 2, 3]
    assert cache.evict(100) == 2
    assert cache.evict(100) == 0
    assert cache.total_size == 0 and sorted(log.freed) == [1, 2, 3, 4, 5]
    cache.check_invariants()


def test_locked_paths_are_never_evicted() -> None:
    log = FreeLog()
    cache = RadixCache(log)
    cache.insert([1, 2, 3], t(1, 2, 3))
    cache.insert([1, 2, 4], t(1, 2, 4))
    cache.insert([5], t(5))
    locked = cache.match_prefix([1, 2, 3]).last_node
    cache.inc_lock_ref(locked)
    assert cache.evict(100) == 2  # (4,) and (5,) only
    assert sorted(log.freed) == [4, 5]
    assert cache.match_prefix([1, 2, 3]).slots.tolist() == [1, 2, 3]
    assert cache.evictable_size == 0 and cache.protected_size == 3
    cache.check_invariants()
    cache.dec_lock_ref(locked)
    assert cache.evict(100) == 3
    assert cache.total_size == 0


def test_lock_on_inner_node_protects_only_its_path() -> None:
    log = FreeLog()
    cache = RadixCache(log)
    cache.insert([1, 2, 3, 4], t(1, 2, 3, 4))
    inner = cache.match_prefix([1, 2]).last_node
    cache.inc_lock_ref(inner)
    assert cache.evictable_size == 2 and cache.protected_size == 2
    assert cache.evict(100) == 2
    assert sorted(log.freed) == [3, 4]
    assert not inner.children  # a locked leaf is not a candidate
    assert cache.evict(100) == 0
    cache.check_invariants()


def test_evicting_leaf_makes_parent_candidate() -> None:
    log = FreeLog()
    cache = RadixCache(log)
    cache.insert([1, 2, 3, 4], t(1, 2, 3, 4))
    cache.match_prefix([1, 2])  # split: (1,2) -> (3,4)
    cache.insert([9], t(9))  # accessed after the (1,2) path
    # (3,4) is the oldest leaf; once it goes, (1,2) (older than (9,)) goes next.
    assert cache.evict(3) == 4
    assert log.freed == [3, 4, 1, 2]
    assert cache.match_prefix([9]).slots.tolist() == [9]
    cache.check_invariants()


def test_evicted_node_cannot_be_locked() -> None:
    cache = RadixCache(FreeLog())
    cache.insert([1, 2], t(1, 2))
    node = cache.match_prefix([1, 2]).last_node
    cache.evict(2)
    with pytest.raises(ValueError):
        cache.inc_lock_ref(node)


def test_reset() -> None:
    log = FreeLog()
    cache = RadixCache(log)
    cache.insert([1, 2, 3], t(1, 2, 3))
    cache.insert([1, 4], t(1, 4))
    node = cache.match_prefix([1, 4]).last_node
    cache.inc_lock_ref(node)
    with pytest.raises(RuntimeError):
        cache.reset()
    assert cache.total_size == 4 and log.freed == []
    cache.dec_lock_ref(node)
    cache.reset()
    assert sorted(log.freed) == [1, 2, 3, 4]
    assert cache.total_size == cache.evictable_size == cache.protected_size == 0
    assert not cache.root.children
    assert cache.match_prefix([1, 2, 3]).slots.numel() == 0
    assert cache.evict(10) == 0
    with pytest.raises(ValueError):
        cache.inc_lock_ref(node)
    cache.check_invariants()
    assert cache.insert([1, 2], t(7, 8)) == 0
    cache.check_invariants()


def test_disable_mode() -> None:
    log = FreeLog()
    cache = RadixCache(log, disable=True)
    assert cache.insert([1, 2, 3], t(1, 2, 3)) == 0
    m = cache.match_prefix([1, 2, 3])
    assert m.slots.numel() == 0 and m.last_node is cache.root
    cache.inc_lock_ref(m.last_node)
    cache.dec_lock_ref(m.last_node)
    assert cache.total_size == 0 and cache.evict(10) == 0
    cache.reset()
    assert log.freed == []
    cache.check_invariants()


def test_check_invariants_detects_corruption() -> None:
    cache = RadixCache(FreeLog())
    cache.insert([1, 2, 3], t(1, 2, 3))
    cache.insert([1, 2, 4], t(1, 2, 4))
    cache.check_invariants()
    cache._evictable_size += 1
    with pytest.raises(AssertionError, match="evictable_size"):
        cache.check_invariants()
    cache._evictable_size -= 1
    leaf = cache.match_prefix([1, 2, 3]).last_node
    leaf.lock_ref = 1  # locked without going through inc_lock_ref
    with pytest.raises(AssertionError):
        cache.check_invariants()
    leaf.lock_ref = 0
    leaf.value = t(3, 3)
    with pytest.raises(AssertionError, match="key length"):
        cache.check_invariants()
    leaf.value = t(2)  # slot 2 is already used by the shared (1,2) node
    with pytest.raises(AssertionError, match="twice"):
        cache.check_invariants()
    leaf.value = t(3)
    cache._evictable_leaves.discard(leaf)
    with pytest.raises(AssertionError, match="evictable-leaf set"):
        cache.check_invariants()


# ------------------------------------------------------------ stateful model test

NUM_SLOTS = 64
tokens = st.lists(st.integers(0, 2), min_size=1, max_size=12)


class RadixCacheMachine(RuleBasedStateMachine):
    """Drives a RadixCache the way the scheduler does, against a dict reference model.

    Reference: ``ref`` maps every cached token prefix to the slot of its last token; it is
    updated on insert and, through the free callback, whenever the cache frees slots.
    Running requests own the slots they allocated beyond their matched prefix until they
    finish (insert) or abort.
    """

    @initialize()
    def setup(self) -> None:
        self.pool = KVPool(NUM_SLOTS, 1, 1, 1, torch.float32)
        self.cache = RadixCache(self._free_from_cache)
        self.ref: dict[tuple[int, ...], int] = {}
        self.slot_owner: dict[int, tuple[int, ...]] = {}
        self.freed_by_cache: list[int] = []
        # (node, prefix it spells) locked explicitly
        self.locks: list[tuple[TreeNode, tuple[int, ...]]] = []
        # running requests: (key, matched prefix slots, own slots, locked node)
        self.running: list[tuple[tuple[int, ...], torch.Tensor, torch.Tensor, TreeNode]] = []

    # -------------------------------------------------------------- helpers

    def _free_from_cache(self, slots: torch.Tensor) -> None:
        for s in slots.tolist():
            assert s in self.slot_owner, f"cache freed slot {s} it does not own"
            prefix = self.slot_owner.pop(s)
            assert self.ref.pop(prefix) == s
            self.freed_by_cache.append(s)
        self.pool.free(slots)

    def _ref_match_len(self, key: tuple[int, ...]) -> int:
        n = 0
        while n < len(key) and key[: n + 1] in self.ref:
            n += 1
        return n

    def _check_match(self, key: tuple[int, ...], m: MatchResult) -> None:
        n = self._ref_match_len(key)
        assert m.slots.tolist() == [self.ref[key[: i + 1]] for i in range(n)]
        assert path_key(self.cache, m.last_node) == key[:n]

    def _alloc(self, n: int) -> torch.Tensor | None:
        slots = self.pool.alloc(n)
        if slots is None:
            self._evict(n - self.pool.num_free)
            slots = self.pool.alloc(n)
            event("alloc failed after evict" if slots is None else "alloc needed evict")
        return slots

    def _evict(self, amount: int) -> int:
        before = {leaf: leaf.last_access for leaf in leaves(self.cache) if leaf.lock_ref == 0}
        evictable_before = self.cache.evictable_size
        self.freed_by_cache.clear()
        freed = self.cache.evict(amount)
        assert freed == len(self.freed_by_cache)
        assert freed == evictable_before - self.cache.evictable_size
        assert freed >= amount or self.cache.evictable_size == 0
        event("evict freed something" if freed else "evict freed nothing")
        # LRU: no surviving unlocked leaf is older than an evicted one (among original leaves).
        survivors = set(leaves(self.cache))
        gone = [v for k, v in before.items() if k not in survivors]
        kept = [v for k, v in before.items() if k in survivors]
        if gone and kept:
            assert max(gone) <= min(kept)
        return freed

    # ---------------------------------------------------------------- rules

    @rule(key=tokens)
    def match(self, key: list[int]) -> None:
        k = tuple(key)
        self._check_match(k, self.cache.match_prefix(k))

    @precondition(lambda self: len(self.running) < 4)
    @rule(key=tokens)
    def start_request(self, key: list[int]) -> None:
        k = tuple(key)
        m = self.cache.match_prefix(k)
        self._check_match(k, m)
        self.cache.inc_lock_ref(m.last_node)
        own = self._alloc(len(k) - m.slots.numel())
        if own is None:
            self.cache.dec_lock_ref(m.last_node)
            return
        self.running.append((k, m.slots, own, m.last_node))

    @precondition(lambda self: self.running)
    @rule(data=st.data(), relock=st.booleans())
    def finish_request(self, data: st.DataObject, relock: bool) -> None:
        idx = data.draw(st.integers(0, len(self.running) - 1))
        k, prefix, own, node = self.running.pop(idx)
        full = torch.cat([prefix, own])
        expect = self._ref_match_len(k)
        assert expect >= prefix.numel(), "locked prefix vanished"
        ret = self.cache.insert(k, full)
        assert ret == expect
        for i in range(ret, len(k)):
            s = int(full[i])
            self.ref[k[: i + 1]] = s
            self.slot_owner[s] = k[: i + 1]
        # Exactly what the scheduler frees: duplicates the tree already had.
        self.pool.free(full[prefix.numel() : ret])
        if relock:
            m = self.cache.match_prefix(k)
            assert m.slots.numel() == len(k)
            self._check_match(k, m)
            self.cache.inc_lock_ref(m.last_node)
            self.locks.append((m.last_node, k))
        self.cache.dec_lock_ref(node)

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def abort_request(self, data: st.DataObject) -> None:
        idx = data.draw(st.integers(0, len(self.running) - 1))
        _, _, own, node = self.running.pop(idx)
        self.pool.free(own)
        self.cache.dec_lock_ref(node)

    @rule(key=tokens)
    def insert_unlocked(self, key: list[int]) -> None:
        """Insert with freshly allocated slots for the whole key and no lock held."""
        k = tuple(key)
        slots = self._alloc(len(k))
        if slots is None:
            return
        expect = self._ref_match_len(k)
        ret = self.cache.insert(k, slots)
        assert ret == expect
        for i in range(ret, len(k)):
            self.ref[k[: i + 1]] = int(slots[i])
            self.slot_owner[int(slots[i])] = k[: i + 1]
        self.pool.free(slots[:ret])

    @rule(key=tokens)
    def lock(self, key: list[int]) -> None:
        m = self.cache.match_prefix(tuple(key))
        self._check_match(tuple(key), m)
        self.cache.inc_lock_ref(m.last_node)
        self.locks.append((m.last_node, tuple(key[: m.slots.numel()])))

    @precondition(lambda self: self.locks)
    @rule(data=st.data())
    def unlock(self, data: st.DataObject) -> None:
        idx = data.draw(st.integers(0, len(self.locks) - 1))
        node, prefix = self.locks.pop(idx)
        assert path_key(self.cache, node) == prefix
        self.cache.dec_lock_ref(node)

    @rule(amount=st.integers(0, NUM_SLOTS + 4))
    def evict(self, amount: int) -> None:
        self._evict(amount)

    @rule()
    def reset(self) -> None:
        locked = any(node is not self.cache.root for node, _ in self.locks) or any(
            node is not self.cache.root for *_, node in self.running
        )
        if locked:
            size = self.cache.total_size
            with pytest.raises(RuntimeError):
                self.cache.reset()
            assert self.cache.total_size == size
        else:
            self.cache.reset()
            assert not self.ref and not self.slot_owner

    # ----------------------------------------------------------- invariants

    @invariant()
    def tree_matches_reference(self) -> None:
        self.cache.check_invariants()
        assert tree_items(self.cache) == self.ref
        for prefix in self.ref:
            assert prefix[:-1] in self.ref or len(prefix) == 1

    @invariant()
    def locked_prefixes_survive(self) -> None:
        held = [(node, prefix) for node, prefix in self.locks]
        held += [(node, k[: prefix.numel()]) for k, prefix, _, node in self.running]
        for node, prefix in held:
            assert path_key(self.cache, node) == prefix
            assert all(prefix[: i + 1] in self.ref for i in range(len(prefix)))

    @invariant()
    def slot_accounting(self) -> None:
        running_owned = [s for *_, own, _ in self.running for s in own.tolist()]
        cache = self.cache
        assert (
            self.pool.num_free + cache.evictable_size + cache.protected_size + len(running_owned)
            == NUM_SLOTS
        )
        free = self.pool.free_slots()
        in_tree = list(self.ref.values())
        everything = free + in_tree + running_owned
        assert len(everything) == len(set(everything)), "a slot is in two places at once"
        assert set(everything) == set(range(1, NUM_SLOTS + 1)), "a slot leaked"


RadixCacheMachine.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestRadixCacheStateful = RadixCacheMachine.TestCase
