"""The offload manager on the CPU: same outputs as the resident model, statistics that add up."""

import itertools
import json
import random
from pathlib import Path

import pytest
import torch

from llama4_local.errors import UserError
from llama4_local.loader import load_model
from offload.plan import GiB, Quantized, plan_memory
from offload.policy import LRU, LFUDecay, belady, replay
from offload.setup import OffloadOptions

DATA = Path(__file__).parent / "data"


def run(model, prompt: torch.Tensor, decode: int = 6, feed: list[int] | None = None) -> tuple[torch.Tensor, list[int]]:
    """Prefill in two pieces, then greedy decode (or decode `feed`'s tokens: the same inputs for
    runs whose arithmetic differs, so a near tie cannot send them down different continuations);
    all logits and the decoded tokens."""
    cache = model.new_cache(64)
    cut = prompt.shape[0] // 2
    logits = [model(prompt[:cut], cache, last_only=False), model(prompt[cut:], cache, last_only=False)]
    tokens = []
    for i in range(decode):
        tok = int(logits[-1][-1].argmax()) if feed is None else feed[i]
        tokens.append(tok)
        logits.append(model(torch.tensor([tok], device=prompt.device), cache))
    return torch.cat(logits), tokens


PROMPT = torch.randint(0, 300, (20,), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def references(all_ckpts, scout_int4):
    refs = {}
    for name, path in all_ckpts.items():
        refs[name] = (path, "float32", run(load_model(path, "float32", "cpu")[0], PROMPT))
    path = scout_int4[0]
    refs["int4"] = (path, "bfloat16", run(load_model(path, "bfloat16", "cpu")[0], PROMPT))
    return refs


def offloaded(path, dtype, **kw):
    model, _ = load_model(path, dtype, "cpu", offload=OffloadOptions(**kw))
    assert model.offload is not None
    return model


def test_every_slot_count_gives_identical_outputs(references):
    path, dtype, (want, want_tokens) = references["scout"]
    total = 4 * 4
    for slots in range(1, total + 1):
        model = offloaded(path, dtype, slots=slots, miss_policy="swap")
        got, tokens = run(model, PROMPT)
        assert torch.equal(got, want), slots
        assert tokens == want_tokens
        t = model.offload.totals()
        assert t.hits + t.misses == t.uses
        if slots == total:
            assert t.loads <= total  # nothing is ever evicted


@pytest.mark.parametrize("name", ["maverick", "multimodal", "int4"])
@pytest.mark.parametrize("policy,miss,prefetch", [("lru", "swap", True), ("lfu", "cpu", False), ("lru", "auto", True)])
def test_every_policy_and_checkpoint_kind(references, name, policy, miss, prefetch):
    path, dtype, (want, want_tokens) = references[name]
    for slots in (1, 3):
        model = offloaded(path, dtype, slots=slots, policy=policy, miss_policy=miss, prefetch=prefetch)
        got, tokens = run(model, PROMPT)
        assert torch.equal(got, want), (name, slots)
        assert tokens == want_tokens


def test_statistics_add_up(references):
    path, dtype, _ = references["multimodal"]  # top-2 routing, MoE on layers 0, 2, 3
    model = offloaded(path, dtype, slots=2, miss_policy="cpu", prefetch=True)
    uses = {}

    def observe(layer, idx):  # distinct experts per layer per forward: what the layer runs
        uses[layer] = uses.get(layer, 0) + idx.unique().numel()

    for layer in model.layers:
        if layer.is_moe:
            layer.feed_forward.observer = observe
    run(model, PROMPT, decode=8)
    m = model.offload
    assert set(m.stats) == {0, 2, 3}
    for i, st in m.stats.items():
        assert st.uses == uses[i]
        assert st.hits + st.misses == st.uses
        assert st.cpu <= st.misses and st.cpu > 0  # decode misses went to the CPU
        assert st.bytes_moved == st.loads * m.cache.layout.nbytes
        assert 0 <= st.prefetch_correct <= st.prefetch_guessed
    summary = m.summary()
    assert summary["total"]["uses"] == sum(uses.values())
    assert 0 <= summary["total"]["hit_rate"] <= 1


def test_prefetch_guesses_and_hits(references):
    path, dtype, (want, _) = references["scout"]
    on = offloaded(path, dtype, slots=8, miss_policy="swap", prefetch=True)
    off = offloaded(path, dtype, slots=8, miss_policy="swap", prefetch=False)
    assert torch.equal(run(on, PROMPT)[0], want)
    run(off, PROMPT)
    a, b = on.offload.totals(), off.offload.totals()
    assert a.prefetch_guessed > 0 and a.prefetch_correct > 0 and a.prefetch_loads > 0
    assert b.prefetch_guessed == 0
    assert a.hits >= b.hits  # prefetched experts count as hits when the layer runs


def test_host_budget_rebuilds_the_rest(references, monkeypatch):
    from llama4_local.checkpoint import Checkpoint

    dropped = []
    real = Checkpoint.drop_pages

    def spy(self, names):
        dropped.append(tuple(names))
        return real(self, names)

    monkeypatch.setattr(Checkpoint, "drop_pages", spy)
    path, dtype, (want, _) = references["int4"]
    model = offloaded(path, dtype, slots=2, miss_policy="swap", host_memory=1)  # no expert held
    assert torch.equal(run(model, PROMPT)[0], want)
    store = model.offload.cache.store
    assert store.blocks == {} and store.rebuilt > 0
    # Each expert read from the files beyond the budget has its pages dropped from the page cache.
    assert len(dropped) == store.rebuilt
    assert all(len(d) == 9 and all(".feed_forward.experts." in n for n in d) for d in dropped)  # 3 x 3 tensors
    assert {n.rsplit(".", 1)[1] for d in dropped for n in d} == {"weight_packed", "weight_scale", "weight_shape"}


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_host_tier_follows_the_routing(references, policy):
    path, dtype, (want, _) = references["int4"]
    probe = offloaded(path, dtype, slots=1, miss_policy="swap")
    one = probe.offload.cache.layout.nbytes
    model = offloaded(path, dtype, slots=1, miss_policy="swap", host_memory=2 * one, policy=policy)
    store = model.offload.cache.store
    first = set(store.blocks)
    assert torch.equal(run(model, PROMPT)[0], want)
    assert len(store.blocks) == 2 and store.replaced > 0 and set(store.blocks) != first
    assert model.offload.summary()["host_replaced"] == store.replaced


@pytest.mark.parametrize(
    ("slots", "held", "miss", "fewer"), [(1, 2, "swap", 0), (6, 10, "swap", 1), (8, 8, "cpu", 0), (4, 12, "auto", 1)]
)
def test_host_tier_is_exclusive(references, slots, held, miss, fewer):
    """With some experts in RAM, an expert copied to the device leaves RAM and one the device
    evicts is copied back: outputs unchanged, no expert held twice; where RAM and device together
    hold the 16 experts (and copies of the device's experts in RAM would not), fewer reads from
    the files than the same RAM holding copies (`fewer`; this model's prefill pieces cycle
    through every expert, so a smaller total gains nothing)."""
    path, dtype, (want, _) = references["int4"]
    one = offloaded(path, dtype, slots=1, miss_policy="swap").offload.cache.layout.nbytes
    reads = {}
    for exclusive in (True, False):
        model = offloaded(path, dtype, slots=slots, miss_policy=miss, host_memory=held * one)
        cache = model.offload.cache
        store = cache.store
        assert store.exclusive
        store.exclusive = exclusive
        assert torch.equal(run(model, PROMPT)[0], want)
        t = model.offload.totals()
        reads[exclusive] = store.rebuilt
        if exclusive:
            assert not set(store.blocks) & set(cache.slot_of)  # never in both
            assert len(store.blocks) + len(store.free) == held + 1  # the budget's rows and the spare
            assert t.bytes_moved == (t.loads + t.spills) * one and (t.spills > 0 or miss == "cpu")
        else:
            assert t.spills == 0
    assert reads[True] < reads[False] if fewer else reads[True] <= reads[False], reads


def test_cpu_misses_not_read_from_files_where_the_device_store_holds_them(references):
    """Where the CPU has a store of its own (the stock CUDA kernel's layout differs from the CPU's)
    and it lacks an expert that the device's store holds in RAM, the miss is copied from RAM
    rather than computed on the CPU from the checkpoint's files."""
    from offload.cache import HostStore

    path, dtype, (want, _) = references["int4"]
    one = offloaded(path, dtype, slots=1, miss_policy="swap").offload.cache.layout.nbytes
    model = offloaded(path, dtype, slots=2, miss_policy="cpu", host_memory=8 * one, prefetch=False)
    m = model.offload
    dev = m.cache.store
    cpu = m.cpu_store = HostStore(dev.layout, dev.keys, dev.build, pin=False, budget_bytes=0)  # holds none
    seen = []
    block = cpu.block
    cpu.block = lambda key: (seen.append(key in dev.blocks), block(key))[1]
    assert torch.equal(run(model, PROMPT)[0], want)
    t = m.totals()
    assert seen and not any(seen) and t.cpu == len(seen)  # only experts RAM did not hold went to the CPU
    assert t.loads > 2  # the others were copied from RAM


def test_prefetch_from_disk_only_starts_read_ahead(references, monkeypatch):
    from llama4_local.checkpoint import Checkpoint

    hinted = []
    monkeypatch.setattr(Checkpoint, "prefetch_pages", lambda self, names: hinted.append(tuple(names)))
    path, dtype, (want, _) = references["int4"]
    model = offloaded(path, dtype, slots=2, miss_policy="swap", host_memory=1, prefetch=True)
    assert torch.equal(run(model, PROMPT)[0], want)
    t = model.offload.totals()
    assert t.disk_hints == len(hinted) > 0 and t.prefetch_loads == 0  # hints, no synchronous reads
    assert all(len(h) == 9 for h in hinted)


def test_tensor_byte_ranges(references):
    from llama4_local.checkpoint import open_checkpoint

    path = references["int4"][0]
    ckpt = open_checkpoint(path)
    for name in ("layers.0.feed_forward.experts.1.up_proj.weight_packed", "layers.1.self_attn.q_proj.weight"):
        shard, off, length = ckpt.byte_range(name)
        with open(shard, "rb") as f:
            f.seek(off)
            raw = f.read(length)
        t = ckpt.get(name)
        assert raw == t.contiguous().view(torch.uint8).numpy().tobytes()
    assert ckpt.drop_pages([name]) in (0, length)


def test_bad_offload_options(scout_ckpt):
    with pytest.raises(UserError, match="--expert-cache-slots"):
        load_model(scout_ckpt, "float32", "cpu", offload=OffloadOptions(slots=0))
    with pytest.raises(UserError, match="--cache-policy"):
        load_model(scout_ckpt, "float32", "cpu", offload=OffloadOptions(slots=2, policy="fifo"))
    with pytest.raises(UserError, match="--miss-policy"):
        load_model(scout_ckpt, "float32", "cpu", offload=OffloadOptions(slots=2, miss_policy="never"))
    with pytest.raises(UserError, match="--gpu-memory"):
        load_model(scout_ckpt, "float32", "cpu", offload=OffloadOptions(gpu_memory=GiB))


# -- the planner at Scout's real sizes ------------------------------------------------------------


@pytest.fixture(scope="module")
def scout_cfg(tmp_path_factory):
    from llama4_local.config import load_config

    d = tmp_path_factory.mktemp("scout-config")
    (d / "config.json").write_text((DATA / "scout-instruct-config.json").read_text())
    return load_config(d)


@pytest.mark.parametrize("gib", [24, 80])
@pytest.mark.parametrize("context", [8192, 131072])
def test_plan_never_exceeds_its_budget(scout_cfg, gib, context):
    q = Quantized(group_size=128)
    plan = plan_memory(scout_cfg, gib * GiB, context, 2, q)
    assert plan.used <= gib * GiB
    assert plan.experts_total == 48 * 16
    # An INT4 expert (3 x 5120 x 8192 nibbles plus a bf16 scale and offset per 128 weights).
    assert plan.expert_bytes == 3 * (5120 * 8192 // 2 + 5120 * 8192 // 128 * 4)
    if gib == 24:
        assert 0 < plan.slots < plan.experts_total
        # Adding one more slot would break the budget: the plan uses what it is given.
        assert plan.used + plan.expert_bytes > gib * GiB
    else:
        assert context == 131072 or plan.all_resident


def test_plan_names_the_minimum(scout_cfg):
    with pytest.raises(UserError, match=r"at least (\d+\.\d) GiB") as e:
        plan_memory(scout_cfg, 8 * GiB, 8192, 2, Quantized())
    need = float(e.value.args[0].split("at least ")[1].split(" GiB")[0])
    plan_memory(scout_cfg, int((need + 0.1) * GiB), 8192, 2, Quantized())  # the named minimum works
    with pytest.raises(UserError):  # bf16 Scout's non-expert part alone is ~20.5 GiB
        plan_memory(scout_cfg, 20 * GiB, 8192, 2, None)


def test_plan_keeps_embeddings_in_host_ram_where_experts_do_not_fit(scout_cfg):
    """Scout's embeddings (1.93 GiB, a row a token) go to host RAM where not every expert fits on
    the GPU, and their room holds ~30 more experts; where every expert fits, or would fit only
    with the embeddings moved, or the table is the lm_head too (tied), they stay on the GPU."""
    from dataclasses import replace

    q = Quantized(group_size=128, attention=True)
    one, emb = 3 * (5120 * 8192 // 2 + 5120 * 8192 // 128 * 4), 202048 * 5120 * 2
    tied = replace(scout_cfg, tie_word_embeddings=True)
    for gib in (16, 24, 48):
        plan, kept = plan_memory(scout_cfg, gib * GiB, 8192, 2, q), plan_memory(tied, gib * GiB, 8192, 2, q)
        assert plan.host_dense == {"embeddings": emb} and "embeddings" not in plan.dense
        assert ("embeddings (a row a token)", "cpu", emb) in plan.rows() and ("embeddings", "gpu", emb) in kept.rows()
        assert emb // one == 30 and plan.slots - kept.slots in (30, 31)
        assert plan.used <= gib * GiB < plan.used + one  # the room is the slots'

    assert plan_memory(scout_cfg, 24 * GiB, 8192, 2, q).slots == 241
    full = plan_memory(scout_cfg, 80 * GiB, 8192, 2, q)
    assert full.all_resident and not full.host_dense and "embeddings" in full.dense
    # Budgets where moving the embeddings would make room for every expert: the whole model stays
    # on the GPU, fewer experts with it (an expert cache of every expert would be no faster).
    need = full.used
    for short in (one, emb // 2, emb - one):
        band = plan_memory(scout_cfg, need - short, 8192, 2, q)
        assert not band.host_dense and not band.all_resident and band.used <= need - short
    # The minimum named for a too-small budget counts the embeddings in host RAM.
    with pytest.raises(UserError, match="at least") as e:
        plan_memory(scout_cfg, 8 * GiB, 8192, 2, q)
    need = float(e.value.args[0].split("at least ")[1].split(" GiB")[0])
    assert plan_memory(scout_cfg, int((need + 0.1) * GiB), 8192, 2, q).host_dense == {"embeddings": emb}


def test_plan_reads_the_q6_head_where_experts_do_not_fit(scout_cfg):
    """Given a Q6 lm_head the device can read (0.78 GiB against 1.93 in bf16), a plan that leaves
    experts off the GPU takes it and 18 more slots; one that holds every expert keeps the head as
    stored."""
    from quant import q6

    q = Quantized(group_size=128, attention=True)
    head = 202048 * q6.row_bytes(5120)
    bf16 = plan_memory(scout_cfg, 24 * GiB, 8192, 2, q)
    plan = plan_memory(scout_cfg, 24 * GiB, 8192, 2, q, head_q6=head)
    assert plan.head_q6 and not bf16.head_q6 and plan.dense["lm_head"] == head < 0.79 * GiB
    assert plan.slots - bf16.slots == 18 and plan.used <= 24 * GiB < plan.used + plan.expert_bytes
    assert ("lm head (Q6)", "gpu", head) in plan.rows() and ("lm head", "gpu", 202048 * 5120 * 2) in bf16.rows()
    full = plan_memory(scout_cfg, 80 * GiB, 8192, 2, q, head_q6=head)
    assert full.all_resident and not full.head_q6 and full.dense["lm_head"] == 202048 * 5120 * 2


def test_plan_holds_what_available_ram_takes(scout_cfg):
    """Without a host budget the plan keeps every expert in host RAM where the machine's available
    RAM takes them (less 3 GiB and 5%), else as many as it does: Scout's 48 GiB of INT4 experts
    beside a 24 GB GPU on machines of 32 and 64 GB."""
    from offload.plan import host_budget_from

    q = Quantized(group_size=128)
    one = 3 * (5120 * 8192 // 2 + 5120 * 8192 // 128 * 4)
    small = plan_memory(scout_cfg, 24 * GiB, 8192, 2, q, available=28 * GiB)
    room = int(28 * GiB - 3 * GiB - 0.05 * 28 * GiB)
    assert (small.host_budget, small.host_experts, small.host_from_available) == (room, room // one, True)
    # 389 experts beyond RAM, 174 of them on the GPU at a time: RAM holds none of the GPU's.
    cold = 768 - 379 - small.slots
    assert small.host_experts == 379 and ("experts read from disk on demand: 215", "disk", cold * one) in small.rows()
    assert "available RAM" in small.rows()[-2][0]
    big = plan_memory(scout_cfg, 24 * GiB, 8192, 2, q, available=58 * GiB)
    assert (big.host_budget, big.host_experts, big.host_from_available) == (None, 768, False)
    # An explicit budget, or an unknown amount of RAM (0), is taken as it is.
    assert plan_memory(scout_cfg, 24 * GiB, 8192, 2, q, host_budget=64 * GiB, available=28 * GiB).host_experts == 768
    assert plan_memory(scout_cfg, 24 * GiB, 8192, 2, q).host_experts == 768
    assert host_budget_from(10 * GiB, 0) is None and host_budget_from(10 * GiB, 2 * GiB) == 0


def test_host_tier_sized_by_available_ram(references, monkeypatch, capsys):
    """Without --host-memory the stores hold what the machine's available RAM takes: here (reserve
    off) two experts; the others are read from the checkpoint when chosen, the outputs unchanged,
    and one line says so."""
    import offload.plan
    from llama4_local import loader

    path, dtype, (want, _) = references["int4"]
    probe = offloaded(path, dtype, slots=1, miss_policy="swap")
    assert probe.offload.host_budget is None and len(probe.offload.cache.store.blocks) == 16  # room for all
    one = probe.offload.cache.layout.nbytes
    monkeypatch.setattr(offload.plan, "HOST_RESERVE", 0)
    monkeypatch.setattr(offload.plan, "HOST_RESERVE_SHARE", 0.0)
    monkeypatch.setattr(loader, "available_memory", lambda: 2 * one + one // 2)
    capsys.readouterr()
    model = offloaded(path, dtype, slots=1, miss_policy="swap")
    store = model.offload.cache.store
    assert (model.offload.host_budget, model.offload.host_budget_auto) == (2 * one + one // 2, True)
    assert len(store.blocks) == 2
    assert torch.equal(run(model, PROMPT)[0], want)
    assert store.rebuilt > 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("note: 2 of 16 experts fit in this machine's available RAM")


@pytest.fixture(scope="module")
def maverick_cfg(tmp_path_factory):
    from llama4_local.config import load_config

    d = tmp_path_factory.mktemp("maverick-config")
    (d / "config.json").write_text((DATA / "maverick-instruct-config.json").read_text())
    return load_config(d)


@pytest.mark.parametrize("gib", [24, 80])
def test_plan_at_maverick_sizes(maverick_cfg, gib):
    q = Quantized(group_size=128, mlp=True)
    one = 3 * (5120 * 8192 // 2 + 5120 * 8192 // 128 * 4)  # the same expert shape as Scout's
    plan = plan_memory(maverick_cfg, gib * GiB, 8192, 2, q, host_budget=128 * GiB)
    assert plan.used <= gib * GiB and plan.used + plan.expert_bytes > gib * GiB
    assert (plan.experts_total, plan.expert_bytes) == (24 * 128, one)
    assert 0 < plan.slots < plan.experts_total  # 191 GiB of INT4 experts fit neither GPU
    # The 24 dense MLPs (3 x 16384 x 5120 each) in INT4, not 11 GiB of bf16.
    assert plan.dense["dense_mlp"] == 24 * 3 * (16384 * 5120 // 2 + 16384 * 5120 // 128 * 4)
    assert plan.dense["routers"] == 24 * 128 * 5120 * 2
    # 128 GiB of host RAM holds 2056 of the 3072 experts, none of those on the GPU; the rest are
    # read from the checkpoint (at 80 GiB the GPU holds all of those).
    assert plan.host_experts == 128 * GiB // one == 2056
    cold = 1016 - plan.slots
    assert (cold > 0) == (gib == 24)
    assert cold <= 0 or (f"experts read from disk on demand: {cold}", "disk", cold * one) in plan.rows()
    with pytest.raises(UserError, match="at least"):  # bf16 dense MLPs alone are 11.25 GiB
        plan_memory(maverick_cfg, 24 * GiB, 8192, 2, Quantized(group_size=128), vision=2 * GiB)


# -- policies and replay ------------------------------------------------------------------------


def test_auto_policy_by_expert_count(references):
    from offload.policy import resolve_policy

    assert resolve_policy("auto", 16) == "lru" and resolve_policy("auto", 128) == "lfu"
    assert resolve_policy("lru", 128) == "lru"
    path, dtype, _ = references["int4"]
    assert offloaded(path, dtype, slots=2).offload.cache.policy.name == "lru"  # 4 experts per layer


def test_lru_and_lfu_rank_victims():
    lru = LRU()
    for k in "abc":
        lru.insert(k)
    lru.hit("a")
    assert lru.victim("abc") == "b"
    assert lru.victim("ac") == "c"
    lfu = LFUDecay(half_life=1000)
    for k in "aaabbc":
        (lfu.hit if k in lfu.score else lfu.insert)(k)
    assert lfu.victim("abc") == "c"
    assert lfu.victim("ab") == "b"


def brute_force_optimum(trace, slots):
    """Most hits over every eviction choice (exponential; for tiny traces)."""
    best = 0

    def go(i, resident, hits):
        nonlocal best
        if i == len(trace):
            best = max(best, hits)
            return
        k = trace[i]
        if k in resident:
            go(i + 1, resident, hits + 1)
        elif len(resident) < slots:
            go(i + 1, resident | {k}, hits)
        else:
            for v in resident:
                go(i + 1, (resident - {v}) | {k}, hits)

    go(0, frozenset(), 0)
    return best


def test_belady_is_optimal_and_bounds_the_policies():
    rng = random.Random(0)
    for _ in range(30):
        trace = [rng.choice("abcde") for _ in range(11)]
        for slots in (1, 2, 3):
            opt = belady(trace, slots)
            assert opt == brute_force_optimum(trace, slots)
            assert replay(trace, slots, LRU()) <= opt
            assert replay(trace, slots, LFUDecay()) <= opt
    long = [(rng.randrange(4), int(rng.paretovariate(1.2)) % 16) for _ in range(3000)]
    for slots in (4, 16, 32):
        opt = belady(long, slots)
        assert max(replay(long, slots, LRU()), replay(long, slots, LFUDecay())) <= opt


def test_replay_counts_with_full_cache():
    trace = list(itertools.chain.from_iterable([(0, e) for e in range(4)] for _ in range(3)))
    assert replay(trace, 4, LRU()) == 8 == belady(trace, 4)


# -- the command line: prompt with offload options, routing traces, bench --------------------------


def test_prompt_offloaded_equals_resident_and_records_routing(tmp_path, scout_ckpt):
    from offload.trace import accesses, read_trace
    from tests.cli_util import run_cli

    base = ["prompt", "a b c d", "-m", scout_ckpt, "--raw", "--temperature", "0", "--ignore-eos", "-n", "12"]
    base += ["--dtype", "float32", "--device", "cpu", "--json"]
    plain = run_cli(*base, "--record-routing", tmp_path / "plain.csv")
    off = run_cli(*base, "--expert-cache-slots", "2", "--miss-policy", "swap", "--record-routing", tmp_path / "o.csv")
    assert plain.returncode == 0 and off.returncode == 0, off.stderr
    a, b = json.loads(plain.stdout), json.loads(off.stdout)
    assert a["token_ids"] == b["token_ids"]
    assert "expert_cache" not in a["stats"]
    c = b["stats"]["expert_cache"]
    assert c["hits"] + c["misses"] == c["uses"] and c["bytes_moved"] > 0
    rows = read_trace(tmp_path / "o.csv")
    assert rows == read_trace(tmp_path / "plain.csv")  # offloading does not change routing
    forwarded = a["prompt_tokens"] + len(a["token_ids"]) - 1  # the last token is never fed back
    assert len(rows) == forwarded * 4  # one row per token and MoE layer
    assert sorted({r[0] for r in rows}) == list(range(forwarded))
    assert all(len(r[2]) == 1 and 0 <= r[2][0] < 4 for r in rows)
    assert c["uses"] == len(accesses(rows))  # the cache served exactly the trace's accesses
    assert not list(tmp_path.glob(".*partial"))


def test_bench_json(scout_int4):
    from tests.cli_util import run_cli

    r = run_cli(
        "bench",
        "-m",
        scout_int4[0],
        "--device",
        "cpu",
        "--expert-cache-slots",
        "3",
        "--prompt-tokens",
        "24",
        "--gen-tokens",
        "9",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["offload"]["slots"] == 3 and res["offload"]["experts"] == 16
    assert res["prefill"]["tokens"] == 24 and res["decode"]["tokens"] == 8
    dec = res["decode"]["expert_cache"]
    assert dec["uses"] == 8 * 4  # top-1, 4 MoE layers, one token per step
    assert dec["hits"] + dec["misses"] == dec["uses"]
    assert res["decode"]["tok_s"] > 0 and res["peak_rss_bytes"] > 0
    # how the steps ran: the eager step on the CPU (auto), one CPU kernel for the resident INT4 linears
    assert res["decode_mode"] == "eager" and res["compiled_regions"] is False
    assert len(res["int4_kernels"]) == 1 and res["int4_kernels"][0] in ("avx2_q8", "cpu", "reference")


@pytest.mark.parametrize(
    "extra,words",
    [
        (["--expert-cache-slots", "0"], ["--expert-cache-slots"]),
        (["--gpu-memory", "24GiB"], ["--gpu-memory", "CPU"]),
        (["--gpu-memory", "lots"], ["size"]),
        (["--expert-cache-slots", "2", "--cache-policy", "fifo"], ["--cache-policy"]),
        (["--expert-cache-slots", "2", "--miss-policy", "sometimes"], ["--miss-policy"]),
        (["--record-routing", "/nonexistent/dir/trace.csv"], ["--record-routing", "does not exist"]),
    ],
)
def test_bad_offload_input_is_one_line(scout_ckpt, extra, words):
    from tests.test_bad_input import assert_user_error, prompt

    assert_user_error(prompt(scout_ckpt, *extra), *words)


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_live_cache_equals_offline_replay_of_its_trace(tmp_path, scout_ckpt, policy):
    """Without prefetch, the live cache's hits are what replaying the recorded trace gives."""
    from offload.policy import make_policy
    from offload.trace import RoutingRecorder, access_groups, accesses, read_trace

    model = offloaded(scout_ckpt, "float32", slots=5, policy=policy, miss_policy="swap", prefetch=False)
    rec = RoutingRecorder(tmp_path / "t.csv", model)
    run(model, PROMPT, decode=12)
    rec.close()
    rows = read_trace(tmp_path / "t.csv")
    t = model.offload.totals()
    assert t.uses == len(accesses(rows))
    assert t.hits == replay(access_groups(rows), 5, make_policy(policy))


def test_committed_small_trained_model_runs_and_is_trained():
    """benchmarks/small-llama4 (used by the quality and routing benchmarks) loads and knows its text."""
    from llama4_local.evaluate import evaluate
    from llama4_local.tokenizer import Tokenizer

    path = Path(__file__).parents[1] / "benchmarks" / "small-llama4"
    tok = Tokenizer(path)
    ids = tok.encode((path / "eval.txt").read_text()[:6000], add_special_tokens=False)
    model, cfg = load_model(path, "float32", "cpu")
    assert cfg.num_experts == 16 and all(cfg.moe_layers) and not cfg.rope_layers[3]
    assert evaluate(model, ids, 256, tok.bos_id, max_windows=4).perplexity < 60  # random weights: ~1000
