#!/usr/bin/env bash
# GPU device check (issue 8, item 6): run by whoever holds a CUDA machine, in at most ~8 minutes.
#
#   bash benchmarks/device_check.sh            # from the repository root (or anywhere: it cd's there)
#
# 1. picks a Python with a CUDA torch (.venv, else python3; a venv with --system-site-packages when modules are
#    missing, installing only those: never a second torch);
# 2. runs the CUDA tests (`pytest -k cuda`: the tests named *cuda*, e.g. test_device_cuda, skipped without a GPU)
#    plus an inline check that the batched engine and run_sweep work on cuda and agree with the CPU;
# 3. regenerates a default-fidelity subset of the figures on --device cuda (seeds as in the committed CPU JSON)
#    and compares each verdict with the committed CPU one (figures/<id>.json);
# 4. prints a timing table: the sequential loop vs the batched engine on cuda (and the CPU loop for scale).
# Everything goes to $OUT (default ./device-check-out): summary.txt, env.txt, tests.txt, figures/, timing.txt.
# Each step has its own time limit (STEP_TESTS, STEP_FIGURES, STEP_TIMING seconds); a step that runs out is
# reported as such and the script goes on. Data: MNIST from $LORA_THEORY_DATA / ~/.cache/lora-theory if there
# (copy mnist.npz + mnist.json there to use it); without it the figures report "unavailable" and the timing
# uses a synthetic 784-dim task of the same shape.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/device-check-out}
mkdir -p "$OUT/figures"
STEP_TESTS=${STEP_TESTS:-100}
STEP_FIGURES=${STEP_FIGURES:-240}
STEP_TIMING=${STEP_TIMING:-90}
FIGS=${FIGS:-"rslora-thm-coordcheck rslora-fig2-loss-vs-rank allora-fig1-dropout-mc lowr-fig2-channel-corr allora-prop1-ripple"}
T0=$(date +%s)
log() { echo "[device-check +$(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/summary.txt"; }
export LORA_THEORY_CACHE=${LORA_THEORY_CACHE:-$OUT/run-cache}   # cold run cache: the figures really train
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"            # the checkout, installed or not
export MPLBACKEND=Agg

# --- 1. Python ------------------------------------------------------------------------------------------------
has_cuda_torch() { "$1" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; }
PY=""
for candidate in .venv/bin/python python3; do
    if command -v "$candidate" >/dev/null 2>&1 && has_cuda_torch "$candidate"; then PY=$candidate; break; fi
done
if [ -z "$PY" ]; then
    log "no Python with a CUDA torch found (.venv/bin/python, python3); installing torch into .venv-gpu"
    python3 -m venv --system-site-packages .venv-gpu && .venv-gpu/bin/pip install -q torch \
        && has_cuda_torch .venv-gpu/bin/python && PY=.venv-gpu/bin/python
    if [ -z "$PY" ]; then log "FAILED: no CUDA torch (no GPU visible, or no network to install one)"; exit 1; fi
fi
MISSING=$("$PY" - <<'EOF'
import importlib.util
need = {"numpy": "numpy", "scipy": "scipy", "matplotlib": "matplotlib", "seaborn": "seaborn", "tqdm": "tqdm",
        "pytest": "pytest", "hypothesis": "hypothesis"}
print(" ".join(pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None))
EOF
)
if [ -n "$MISSING" ]; then
    if [ "$PY" != ".venv-gpu/bin/python" ]; then
        python3 -m venv --system-site-packages .venv-gpu   # keeps the system's CUDA torch visible
        PY=.venv-gpu/bin/python
    fi
    log "installing the missing modules only: $MISSING"
    "$PY" -m pip install -q $MISSING || log "WARNING: pip install failed ($MISSING); steps needing them will fail"
fi
{
    echo "python: $PY"; "$PY" -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', \
torch.version.cuda, 'device', torch.cuda.get_device_name(0))"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    echo "CPUs: $(nproc)"
} > "$OUT/env.txt" 2>&1
log "environment: $(tail -n +2 "$OUT/env.txt" | head -3 | tr '\n' ' ')"

# --- 2. CUDA tests + the engines on cuda --------------------------------------------------------------------
timeout "$STEP_TESTS" "$PY" -m pytest -q -p no:cacheprovider -k cuda tests/toymodels > "$OUT/tests.txt" 2>&1
rc=$?
log "pytest -k cuda tests/toymodels: exit $rc ($(tail -1 "$OUT/tests.txt"))"
timeout "$STEP_TESTS" "$PY" - >> "$OUT/tests.txt" 2>&1 <<'EOF'
import numpy as np, torch
torch.set_num_threads(1)
from toymodels import batched, train
small = dict(dataset="synthetic", widths=(32, 64, 64, 10), n_pretrain=256, n_finetune=128, n_test=256,
             pretrain_steps=20, steps=30, batch_size=32, record_every=10, recorders=batched.RECORDERS)
cfgs = [train.FinetuneConfig(**small, seed=s, dropout=p) for s in (0, 1) for p in (0.0, 0.2)]
gpu = batched.finetune_many(cfgs, "cuda", use_cache=False)
cpu = batched.finetune_many(cfgs, "cpu", use_cache=False)
worst = max(float(np.max(np.abs(g[k] - c[k]) / (np.abs(c[k]) + 1e-6))) for g, c in zip(gpu, cpu) for k in c)
print(f"batched engine cuda vs cpu (same masks, drawn on the CPU): max relative difference {worst:.2e}")
assert worst < 1e-3, worst
seq = train.run_sweep(cfgs, device="cuda", workers=1, use_cache=False, progress=False)
par = train.run_sweep(cfgs, device="cuda", workers=2, use_cache=False, progress=False)
same = all(np.array_equal(a[k], b[k]) for a, b in zip(seq, par) for k in a)
print(f"run_sweep on cuda: workers=1 vs workers=2 bit for bit: {same}")
assert same
print("ENGINES ON CUDA: OK")
EOF
rc=$?
log "engines on cuda (batched cuda vs cpu, run_sweep workers 1 vs 2): exit $rc ($(grep -E 'relative|bit for bit' "$OUT/tests.txt" | tr '\n' ';'))"

# --- 2b. diagnose on cuda (issue 17): the calibration forward pass and the per-layer base numerics (Gram +
# eigh, float64) on the GPU equal the CPU's; then the base numerics' seconds per layer at the 7B shapes -------------
timeout "$STEP_TESTS" "$PY" -m pytest -q -p no:cacheprovider -k cuda tests/diagnose > "$OUT/tests-diagnose.txt" 2>&1
rc=$?
log "pytest -k cuda tests/diagnose (lora-theory diagnose --device cuda vs cpu): exit $rc ($(tail -1 "$OUT/tests-diagnose.txt"))"
timeout "$STEP_TESTS" "$PY" - > "$OUT/diagnose-base-cuda.txt" 2>&1 <<'PYEOF'
import time
import numpy as np
import torch
from diagnose.quantities import base_quantities
rng = np.random.default_rng(0)
for d_out, d_in in ((4096, 4096), (11008, 4096), (4096, 11008)):
    W = rng.standard_normal((d_out, d_in)) * 0.02
    A = rng.uniform(-1, 1, (16, d_in)) / np.sqrt(d_in)
    B = 0.02 * rng.standard_normal((d_out, 16))
    base_quantities(W[:512, :512], A[:, :512], B[:512], 2.0, device="cuda")  # warm-up
    torch.cuda.synchronize()
    t = time.perf_counter()
    base_quantities(W, A, B, 2.0, device="cuda")
    print(f"{d_out}x{d_in} base {time.perf_counter() - t:.3f} s")
PYEOF
rc=$?
log "diagnose base numerics per layer on cuda at the 7B shapes: exit $rc ($(tr '\n' ';' < "$OUT/diagnose-base-cuda.txt"))"

# --- 3. figures on cuda, verdicts vs the committed CPU JSONs ---------------------------------------------------
fig_deadline=$(( $(date +%s) + STEP_FIGURES ))
printf "%-36s %-22s %-22s %s\n" "figure" "CPU (committed)" "CUDA (now)" "runtime_s cpu/cuda" > "$OUT/figures/verdicts.txt"
for fig in $FIGS; do
    left=$(( fig_deadline - $(date +%s) ))
    if [ "$left" -le 5 ]; then log "figures: out of time before $fig"; break; fi
    seeds=$("$PY" -c "import json; print(len(json.load(open('figures/$fig.json'))['seeds']))" 2>/dev/null || echo 3)
    timeout "$left" "$PY" -m figures.cli "$fig" --device cuda --seeds "$seeds" --workers 1 --out "$OUT/figures" \
        >> "$OUT/figures/log.txt" 2>&1 || log "figures: $fig exited $? (see figures/log.txt)"
    "$PY" - "$fig" "$OUT/figures" >> "$OUT/figures/verdicts.txt" <<'EOF'
import json, sys
fig, out = sys.argv[1], sys.argv[2]
cpu = json.load(open(f"figures/{fig}.json"))
try:
    gpu = json.load(open(f"{out}/{fig}.json"))
except OSError:
    gpu = {"verdict": "(not finished)", "runtime_s": float("nan")}
mark = "same" if gpu["verdict"] == cpu["verdict"] else "DIFFERENT"
print(f"{fig:<36} {cpu['verdict']:<22} {gpu['verdict']:<22} {cpu['runtime_s']}/{gpu['runtime_s']}  {mark}")
EOF
done
log "figures (default fidelity, cuda) vs committed CPU verdicts:"
tee -a "$OUT/summary.txt" < "$OUT/figures/verdicts.txt"

# --- 4. timing: sequential loop vs batched engine on cuda ------------------------------------------------------
timeout "$STEP_TIMING" "$PY" - > "$OUT/timing.txt" 2>&1 <<'EOF'
import time, torch
torch.set_num_threads(1)
from toymodels import batched, data, train
ok, _ = data.available("mnist", probe_network=False)
base = dict(widths=(784, 256, 256, 10), n_pretrain=4096, n_finetune=512, n_test=2000, pretrain_steps=500, steps=300,
            record_every=25)
base.update(dataset="mnist", task_shift="permute") if ok else base.update(dataset="synthetic")
cfgs = [train.FinetuneConfig(**base, seed=s, dropout=p) for s in range(4) for p in (0.0, 0.1, 0.2, 0.3)]
for c in {c.seed: c for c in cfgs}.values():  # pretrained models first (cached), not timed
    train.pretrain(c, torch.device("cuda"))
    train.pretrain(c, torch.device("cpu"))

def timed(fn):
    torch.cuda.synchronize(); t = time.perf_counter(); fn(); torch.cuda.synchronize(); return time.perf_counter() - t

rows = []
t = timed(lambda: [train.finetune(c, device="cuda", use_cache=False) for c in cfgs[:4]]); rows.append(("sequential loop, cuda", 4, t))
t = timed(lambda: batched.finetune_many(cfgs[:4], "cuda", use_cache=False)); rows.append(("batched K=4, cuda", 4, t))
t = timed(lambda: batched.finetune_many(cfgs, "cuda", use_cache=False)); rows.append(("batched K=16, cuda", 16, t))
t = timed(lambda: batched.finetune_many(cfgs, "cuda", mask_threads=1, use_cache=False)); rows.append(("batched K=16, masks on 1 CPU thread, cuda", 16, t))
t = timed(lambda: [train.finetune(c, device="cpu", use_cache=False) for c in cfgs[:2]]); rows.append(("sequential loop, cpu 1 thread", 2, t))
print(f"timing: {base['dataset']} {base['widths']}, {base['steps']} steps, records every {base['record_every']}, "
      f"dropout 0-0.3 | {torch.cuda.get_device_name(0)}")
ref = rows[0][2] / rows[0][1]
for name, n, t in rows:
    print(f"  {name:<34} {n:3d} runs {t:7.2f} s  {t / n:6.3f} s/run  {ref / (t / n):6.2f}x the cuda loop")
EOF
rc=$?
log "timing (exit $rc):"
tee -a "$OUT/summary.txt" < "$OUT/timing.txt"
log "done in $(( $(date +%s) - T0 )) s; everything is under $OUT"
