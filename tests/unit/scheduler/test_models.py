"""The scheduler's online cost models: priors before samples, the closed forms recovered from heartbeats' step
timings, outliers rejected, the window recent; and round_robin, power_of_two and admission as pure functions."""

import random

import pytest

from kvmesh.services.common.errors import CapacityError
from kvmesh.services.cost_model import StepShape, step_shape
from kvmesh.services.kv_identity import KVLayout
from kvmesh.services.scheduler.models import MIN_SAMPLES, PRIOR_DECODE, PRIOR_PREFILL, StepSample, fit_steps
from kvmesh.services.scheduler.policies import RouteQuery, get_policy, power_of_two, round_robin
from kvmesh.services.scheduler.registry import Load, Registry, Role, WorkerSpec
from kvmesh.services.scheduler.router import route

LAYOUT = KVLayout("tiny", "float32", 16, 2, 2, 8)


def true_seconds(shape: StepShape) -> float:
    return (0.004 + 2e-4 * shape.num_prefill_tokens + 1e-8 * shape.num_attention_pairs
            + 1.5e-3 * shape.num_decode_seqs + 2e-6 * shape.num_context_tokens)


def mixed_steps(rng, count):
    """Steps of a colocated worker: prompt chunks, decode batches, and both at once."""
    steps = []
    for i in range(count):
        chunks = [(rng.randrange(0, 512), rng.randrange(16, 512))] if i % 3 != 1 else []
        if i % 3 != 0:
            chunks += [(rng.randrange(16, 2000), 1) for _ in range(rng.randrange(1, 32))]
        shape = step_shape(chunks)
        steps.append(StepSample(shape, true_seconds(shape) * rng.uniform(0.97, 1.03)))
    return steps


def test_priors_answer_until_enough_samples_arrive():
    assert (fit_steps([]).prefill, fit_steps([]).decode) == (PRIOR_PREFILL, PRIOR_DECODE)
    fit = fit_steps(mixed_steps(random.Random(1), MIN_SAMPLES - 1))
    assert fit.num_samples == MIN_SAMPLES - 1 and not fit.prefill_fitted


def test_a_worker_ten_times_slower_than_the_prior_is_priced_so_from_its_first_steps():
    """A CPU 10x slower than the prior's: before MIN_SAMPLES steps the prior's shape, scaled by what was measured
    (prefill from prompt steps, decode from decode steps), not the prior's 10x-too-fast figures."""
    def slow(shape: StepShape) -> StepSample:
        return StepSample(shape, 10 * (PRIOR_PREFILL.seconds(shape.num_prefill_tokens) if shape.num_prefill_tokens
                                       else PRIOR_DECODE.seconds(shape.num_decode_seqs, shape.num_context_tokens)))

    prompts = [slow(step_shape([(0, n)])) for n in (200, 731)]
    fit = fit_steps(prompts)
    assert fit.prefill.seconds(731) == pytest.approx(10 * PRIOR_PREFILL.seconds(731))
    assert fit.decode.seconds(8, 2000) == pytest.approx(10 * PRIOR_DECODE.seconds(8, 2000))  # one machine
    decodes = [slow(step_shape([(500, 1)] * 8)) for _ in range(3)]
    fit = fit_steps(decodes + [StepSample(step_shape([(0, 300)]), 2 * PRIOR_PREFILL.seconds(300))])
    assert fit.decode.seconds(8, 4000) == pytest.approx(10 * PRIOR_DECODE.seconds(8, 4000))
    assert fit.prefill.seconds(300) == pytest.approx(2 * PRIOR_PREFILL.seconds(300))


def test_the_fit_recovers_both_closed_forms_from_mixed_steps_despite_outliers():
    rng = random.Random(2)
    steps = mixed_steps(rng, 100)
    for i in range(0, 100, 10):  # a stall (GC, a noisy neighbour) in every tenth step: 20x slower
        steps[i] = StepSample(steps[i].shape, steps[i].seconds * 20)
    fit = fit_steps(steps)
    assert fit.num_outliers >= 10
    assert fit.prefill.seconds(1000) == pytest.approx(0.004 + 0.2 + 0.01, rel=0.05)
    assert fit.decode.seconds(16, 16_000) == pytest.approx(0.004 + 0.024 + 0.032, rel=0.05)


def test_a_prefill_worker_keeps_the_decode_prior_and_the_window_follows_a_slower_machine():
    registry = Registry(lease_s=10)
    worker = registry.register(WorkerSpec(Role.PREFILL, "127.0.0.1:1", layout=LAYOUT))
    prompts = [StepSample(step_shape([(0, n)]), 0.002 + 1e-4 * n) for n in range(64, 4096, 64)]
    registry.heartbeat(worker.worker_id, Load(steps=tuple(prompts)))
    assert worker.fit.decode == PRIOR_DECODE and worker.fit.prefill.seconds(1000) == pytest.approx(0.102, rel=0.02)
    assert worker.load.steps == ()  # the samples live in the window, not in the load
    slower = [StepSample(s.shape, 3 * s.seconds) for s in prompts * 3]  # more than a window's worth
    registry.heartbeat(worker.worker_id, Load(steps=tuple(slower)))
    assert worker.fit.prefill.seconds(1000) == pytest.approx(0.306, rel=0.02)


def add(registry, role, port, load=Load()):
    worker = registry.register(WorkerSpec(role, f"127.0.0.1:{port}", layout=LAYOUT))
    registry.heartbeat(worker.worker_id, load)
    return worker


def test_round_robin_takes_each_worker_in_turn_whatever_its_load():
    registry = Registry(lease_s=10)
    decodes = [add(registry, Role.DECODE, p, Load(num_running=10 * p)) for p in (1, 2, 3)]
    add(registry, Role.PREFILL, 9)
    order = []
    for i in range(6):
        plan = route(RouteQuery(f"r{i}", (1, 2, 3)), registry.workers(), round_robin, max_queue=64)
        registry.routed(plan.decode, 3)
        order.append(decodes.index(plan.decode))
    assert order == [0, 1, 2, 0, 1, 2] and get_policy("round_robin") is round_robin


def test_power_of_two_takes_the_less_loaded_of_two_and_never_the_busiest():
    registry = Registry(lease_s=10)
    decodes = [add(registry, Role.DECODE, p, Load(num_running=p)) for p in range(1, 9)]
    add(registry, Role.PREFILL, 99)
    chosen = [route(RouteQuery(f"r{i}", (1, 2)), registry.workers(), power_of_two, 64).decode for i in range(200)]
    assert decodes[-1] not in chosen and len(set(map(id, chosen))) >= 4  # spread, yet never the busiest
    again = route(RouteQuery("r7", (1, 2)), registry.workers(), power_of_two, 64).decode
    assert again is chosen[7]  # a pure function of the request and the workers' state


@pytest.mark.parametrize("colocated", [False, True])
def test_a_burst_is_admitted_only_up_to_the_queue_limit_counting_what_was_routed(colocated):
    registry = Registry(lease_s=10)
    if colocated:  # its prompts wait in its own engine: its heartbeat counts them as pending prefill
        worker = registry.register(WorkerSpec(Role.DECODE, "127.0.0.1:1", layout=LAYOUT, colocated=True))
        registry.heartbeat(worker.worker_id, Load(num_running=40, num_pending_prefill=40))
    else:
        worker = add(registry, Role.DECODE, 1)
        add(registry, Role.PREFILL, 2)
    admitted, refused = 0, []
    for i in range(200):  # no heartbeat in between
        try:
            plan = route(RouteQuery(f"r{i}", tuple(range(1, 200))), registry.workers(), get_policy("slo_aware"), 64)
        except CapacityError as e:
            refused.append(e)
            continue
        registry.routed(plan.decode, 199)
        admitted += 1
    assert admitted == (24 if colocated else 64) and len(refused) == 200 - admitted
    assert all(0 < e.retry_after_s < 60 for e in refused)
