"""Dense CRF (docs/method.md §5) and the CRF process pool."""

import math
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pydensecrf.densecrf as dcrf
import pytest
import torch
from pydensecrf.utils import unary_from_softmax

from smooseg.data.transforms import to_uint8_image
from smooseg.errors import SmoosegError
from smooseg.eval.crf import dense_crf
from smooseg.eval.crf_pool import CRFPool


def _random_case(seed, n_classes=4, size=(20, 30), lp_size=(10, 15)):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    log_probs = torch.log_softmax(torch.from_numpy(rng.normal(0, 2, (n_classes, *lp_size))).float(), 0)
    return image, log_probs


def _two_colour_case(seed=0, height=32, width=48):
    """Left half red, right half blue; logits = true labels + strong noise + flipped patches."""
    rng = np.random.default_rng(seed)
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[:, : width // 2] = (220, 30, 30)
    image[:, width // 2:] = (30, 30, 220)
    labels = np.zeros((height, width), dtype=np.int64)
    labels[:, width // 2:] = 1
    noisy = labels.copy()
    noisy[4:12, width // 2 - 5: width // 2] = 1
    noisy[18:26, width // 2: width // 2 + 5] = 0
    logits = 2.0 * np.eye(2)[noisy].transpose(2, 0, 1) - 1.0 + rng.normal(0, 1.3, (2, height, width))
    return image, torch.from_numpy(logits).float(), labels


def test_output_is_distribution_at_image_size():
    image, log_probs = _random_case(0)
    q = dense_crf(image, log_probs)
    assert q.shape == (4, 20, 30) and q.dtype == np.float32
    assert (q >= 0).all()
    np.testing.assert_allclose(q.sum(0), 1.0, atol=1e-5)


def test_zero_iterations_give_bilinear_softmax_by_hand():
    # two classes, 1×2 -> 1×4 with align_corners=False: [0, 4] -> [0, 1, 3, 4]
    log_probs = np.zeros((2, 1, 2), dtype=np.float32)
    log_probs[0, 0] = [0.0, 4.0]
    image = np.full((1, 4, 3), 128, dtype=np.uint8)
    q = dense_crf(image, log_probs, iters=0)
    expected = 1 / (1 + np.exp(-np.array([0.0, 1.0, 3.0, 4.0])))
    np.testing.assert_allclose(q[0, 0], expected, atol=1e-5)
    np.testing.assert_allclose(q[1, 0], 1 - expected, atol=1e-5)


def test_crf_cleans_noisy_two_colour_labels():
    image, logits, labels = _two_colour_case()
    noisy_acc = (logits.argmax(0).numpy() == labels).mean()
    crf_acc = (dense_crf(image, torch.log_softmax(logits, 0)).argmax(0) == labels).mean()
    assert noisy_acc < 0.85
    assert crf_acc > 0.97
    assert crf_acc > noisy_acc + 0.1


def test_to_uint8_image_truncates_and_moves_channels_last():
    img = torch.tensor([0.0, 0.999, 1.0, 1.5, -0.2, 0.5]).reshape(1, 2, 3).repeat(3, 1, 1)
    img[1] *= 0.5
    out = to_uint8_image(img)
    assert out.dtype == np.uint8 and out.shape == (2, 3, 3)
    np.testing.assert_array_equal(out[..., 0], [[0, 254, 255], [255, 0, 127]])
    np.testing.assert_array_equal(out[..., 1], [[0, 127, 127], [191, 0, 63]])
    np.testing.assert_array_equal(to_uint8_image(img.numpy()), out)
    with pytest.raises(SmoosegError):
        to_uint8_image(torch.zeros(4, 2, 2))
    with pytest.raises(SmoosegError):
        to_uint8_image(torch.zeros(3, 2, 2, dtype=torch.uint8))


def _crf_by_hand(image_for_lattice, log_probs, iters=10):
    probs = torch.softmax(log_probs, 0).numpy()
    k, h, w = probs.shape
    d = dcrf.DenseCRF2D(w, h, k)
    d.setUnaryEnergy(unary_from_softmax(probs))
    d.addPairwiseGaussian(sxy=1, compat=3)
    d.addPairwiseBilateral(sxy=67, srgb=3, rgbim=np.ascontiguousarray(image_for_lattice), compat=4)
    return np.array(d.inference(iters)).reshape(k, h, w)


def test_bilateral_term_sees_bgr():
    image, log_probs = _random_case(1, n_classes=3, size=(12, 16), lp_size=(12, 16))
    q = dense_crf(image, log_probs)
    np.testing.assert_array_equal(q, _crf_by_hand(image[:, :, ::-1], log_probs))
    assert not np.array_equal(q, _crf_by_hand(image, log_probs))


def test_bad_inputs_raise():
    with pytest.raises(SmoosegError):
        dense_crf(np.zeros((8, 8, 4), np.uint8), np.zeros((2, 8, 8)))
    with pytest.raises(SmoosegError):
        dense_crf(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8)))
    for kwargs in ({"num_workers": -1}, {"timeout": 0}, {"max_in_flight": 0}):
        with pytest.raises(SmoosegError):
            CRFPool(**kwargs)
    with pytest.raises(SmoosegError):
        CRFPool().submit([np.zeros((8, 8, 3), np.uint8)], []).result()


def _batches(n_batches=4, batch=3):
    out = []
    for b in range(n_batches):
        cases = [_random_case(10 * b + i) for i in range(batch)]
        out.append(([c[0] for c in cases], torch.stack([c[1] for c in cases])))
    return out


def test_serial_pool_spawns_no_process():
    before = set(multiprocessing.active_children())
    with CRFPool(num_workers=0) as pool:
        images, log_probs = _batches(1)[0]
        result = pool.submit(images, log_probs).result()
        assert pool._executor is None
        assert set(multiprocessing.active_children()) == before
    for q, img, lp in zip(result, images, log_probs, strict=True):
        np.testing.assert_array_equal(q, dense_crf(img, lp))
    with pytest.raises(SmoosegError, match="closed"):
        pool.submit(images, log_probs).result()


def _assert_same_marginals(got, expected):
    """Workers run torch single-threaded, so the bilinear resize may differ in the last bits."""
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(got.argmax(0), expected.argmax(0))


@pytest.fixture(scope="module")
def worker_pool():
    with CRFPool(num_workers=2, max_in_flight=2) as pool:
        yield pool


def test_worker_map_equals_serial(worker_pool):
    images, log_probs = _batches(1)[0]
    # float 3×H×W images are converted by to_uint8_image on the way in
    float_images = [torch.from_numpy(img).permute(2, 0, 1).float() / 255 + 1e-4 for img in images]
    expected = CRFPool(0).submit(images, log_probs).result()
    for got in (worker_pool.submit(images, log_probs).result(),
                worker_pool.submit(float_images, log_probs).result()):
        assert len(got) == len(expected)
        for g, e in zip(got, expected, strict=True):
            _assert_same_marginals(g, e)


def test_pipelined_submit_keeps_order_and_bounds_in_flight(worker_pool):
    batches = _batches(4)
    handles = []
    for images, log_probs in batches:
        handles.append(worker_pool.submit(images, log_probs))
        assert sum(not h.done() for h in worker_pool._in_flight) <= worker_pool.max_in_flight
    for handle, (images, log_probs) in zip(handles, batches, strict=True):
        got = handle.result()
        for g, img, lp in zip(got, images, log_probs, strict=True):
            _assert_same_marginals(g, dense_crf(img, lp))
    assert handles[0].result() is handles[0].result()


def test_job_error_propagates_and_pool_survives(worker_pool):
    with pytest.raises(ValueError):
        worker_pool._run(math.sqrt, [(4.0,), (-1.0,)]).result()
    assert worker_pool._run(math.sqrt, [(9.0,), (16.0,)]).result() == [3.0, 4.0]


def test_killed_worker_raises_instead_of_hanging():
    pool = CRFPool(num_workers=1, timeout=60)
    start = time.monotonic()
    handle = pool._run(signal.raise_signal, [(signal.SIGKILL,), (signal.SIGKILL,)])
    with pytest.raises(SmoosegError, match="died"):
        handle.result()
    assert time.monotonic() - start < 45
    with pytest.raises(SmoosegError, match="closed"):
        pool.submit(*_batches(1)[0]).result()
    pool.close()


def test_slow_job_times_out_and_workers_are_killed():
    pool = CRFPool(num_workers=1, timeout=60)
    assert pool._run(abs, [(-2,)]).result() == [2]
    workers = list(pool._executor._processes.values())
    pool.timeout = 1.0
    start = time.monotonic()
    with pytest.raises(SmoosegError, match="timed out after 1 s"):
        pool._run(time.sleep, [(60,)]).result()
    assert time.monotonic() - start < 8
    assert workers and not any(w.is_alive() for w in workers)
    with pytest.raises(SmoosegError, match="closed"):
        pool.submit(*_batches(1)[0])


def test_labels_mode_returns_the_marginals_argmax(worker_pool):
    images, log_probs = _batches(1)[0]
    marginals = CRFPool(0).submit(images, log_probs).result()
    for pool in (CRFPool(0), worker_pool):
        labels = pool.submit(images, log_probs, labels=True).result()
        for got, q in zip(labels, marginals, strict=True):
            assert got.dtype == np.int16 and got.shape == q.shape[1:]
            np.testing.assert_array_equal(got, q.argmax(0))


def test_waiting_for_a_slow_job_does_not_spin(worker_pool):
    """result() sleeps until a job finishes: the finished first job must not make it busy-wait."""
    handle = worker_pool._run(time.sleep, [(0.0,), (1.5,)])
    cpu = time.process_time()
    assert handle.result() == [None, None]
    assert time.process_time() - cpu < 0.5


def test_busy_workers_counts_running_jobs():
    assert CRFPool(0).busy_workers() == 0
    with CRFPool(num_workers=2) as pool:
        assert pool.busy_workers() == 0
        handle = pool._run(time.sleep, [(1.0,), (1.0,), (1.0,)])
        assert pool.busy_workers() == 2
        handle.result()
        assert pool.busy_workers() == 0


def test_auto_workers_is_one_per_available_core(monkeypatch):
    from smooseg.eval import crf_pool as crf

    monkeypatch.setattr(crf, "available_cores", lambda: 6)
    assert crf.resolve_workers("auto") == 6 and crf.resolve_workers(0) == 0 and crf.resolve_workers(3) == 3
    monkeypatch.setattr(crf, "available_cores", lambda: 200)
    assert crf.resolve_workers("auto") == crf.MAX_AUTO_WORKERS
    for bad in (-1, "four", 2.5, True):
        with pytest.raises(SmoosegError, match="integer >= 0 or auto"):
            crf.resolve_workers(bad)


def test_workers_run_single_threaded_below_the_main_priority(worker_pool):
    from smooseg.eval.crf_pool import WORKER_NICENESS

    assert worker_pool._run(os.nice, [(0,)]).result() == [min(19, os.nice(0) + WORKER_NICENESS)]
    assert worker_pool._run(torch.get_num_threads, [()]).result() == [1]


# ---- the pool's processes: they never outlive the evaluation, and Ctrl-C never hangs it

REPO = Path(__file__).resolve().parents[1]


def gone(pid):
    """Whether process ``pid`` has exited (a zombie waiting to be reaped counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False


def wait_gone(pids, seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not all(gone(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if not gone(p)]


def start_script(code, **kwargs):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


POOL_SCRIPT = """
    import sys, time
    from smooseg.eval.crf_pool import CRFPool
    pool = CRFPool(num_workers=2, timeout=600)
    pool._run(time.sleep, [(0.5,), (0.5,)]).result()        # both workers started
    print(" ".join(map(str, pool._executor._processes)), flush=True)
    handle = pool._run(time.sleep, [(120,)])                  # one worker busy, one idle
    {then}
"""


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads process states from /proc")
def test_workers_die_when_their_parent_is_killed():
    proc = start_script(POOL_SCRIPT.format(then="time.sleep(120)"))
    try:
        workers = [int(pid) for pid in proc.stdout.readline().split()]
        assert len(workers) == 2 and not any(gone(p) for p in workers), proc.stderr.read()
        proc.kill()                                            # SIGKILL: no clean-up runs in the parent
        proc.wait(10)
        assert wait_gone(workers, 5) == []
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads process states from /proc")
def test_the_watchdog_alone_ends_a_worker_whose_parent_died():
    """Where there is no PR_SET_PDEATHSIG (not Linux), the watchdog thread does it."""
    proc = start_script("""
        import multiprocessing, os, time
        from smooseg.eval.crf_pool import die_with_parent

        def child(parent_pid):
            die_with_parent(parent_pid, poll_s=0.1, use_prctl=False)
            time.sleep(120)

        worker = multiprocessing.get_context("fork").Process(target=child, args=(os.getpid(),))
        worker.start()
        print(worker.pid, flush=True)
        time.sleep(120)
    """)
    try:
        line = proc.stdout.readline().strip()
        assert line, proc.stderr.read()
        worker = int(line)
        time.sleep(1.0)                                        # the child has set up its watchdog
        assert not gone(worker)
        proc.kill()
        proc.wait(10)
        assert wait_gone([worker], 5) == []
    finally:
        proc.kill()
        proc.wait()


def test_keyboard_interrupt_while_waiting_kills_the_workers_promptly():
    pool = CRFPool(num_workers=2, timeout=600)
    handle = pool._run(time.sleep, [(60,), (60,), (60,)])
    time.sleep(0.2)
    workers = list(pool._executor._processes.values())
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    start = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            handle.result()
    finally:
        timer.cancel()
    assert time.monotonic() - start < 6
    assert workers and not any(w.is_alive() for w in workers)
    with pytest.raises(SmoosegError, match="closed \\(interrupted\\)"):
        pool.submit(*_batches(1)[0])
    pool.close()


def test_closing_with_jobs_running_does_not_wait_for_them():
    pool = CRFPool(num_workers=1, timeout=600)
    pool._run(time.sleep, [(60,)])
    time.sleep(0.5)
    workers = list(pool._executor._processes.values())
    start = time.monotonic()
    pool.close()
    assert time.monotonic() - start < 6 and not any(w.is_alive() for w in workers)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["waiting", "computing"])
def test_ctrl_c_to_the_process_group_ends_in_one_line(where):
    """Ctrl-C in a terminal signals every process of the group, workers included: the parent alone
    handles it, its pool shuts down at once and nothing prints a traceback."""
    then = {"waiting": "handle.result()", "computing": "while True: sum(range(1000))"}[where]
    script = POOL_SCRIPT.format(then=f"""
    try:
        try:
            {then}
        finally:
            pool.close()
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)""")
    proc = start_script(script, start_new_session=True)
    try:
        workers = [int(pid) for pid in proc.stdout.readline().split()]
        assert len(workers) == 2, proc.stderr.read()
        time.sleep(0.5)
        start = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)                   # what the terminal does on Ctrl-C
        _, err = proc.communicate(timeout=20)
        assert time.monotonic() - start < 10
        assert proc.returncode == 130, err
        assert err.strip().splitlines() == ["error: interrupted"], err
        assert wait_gone(workers, 5) == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
