#!/usr/bin/env bash
# One call on a lent GPU machine (its copy of .git may be stale, nothing is installed): build with the CUDA
# kernels, run the tests, then the benchmark. Logs and results go to $OUT/gpu.tgz; the test summary and the
# benchmark table to stdout.
#   OUT=dir SPECTRAL_KERNELS_COMMIT=$(git rev-parse HEAD)[-dirty] bench/gpu.sh
# Optional: TESTS (pytest arguments, default "tests"; "none" skips), BENCH (bench arguments, default
# "--quick --backends cuda,triton": both GPU backends side by side in one run; "none" skips), PROFILE
# (python -m bench.profile arguments, e.g. "--methods oft --python"; default: not run),
# TEST_TIMEOUT, BENCH_TIMEOUT and PROFILE_TIMEOUT (seconds; the defaults leave the build ~2 minutes of one
# 600 s device call with tests and bench, profile then needs a call of its own).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD  # built in place (tests/test_triton_compile.py runs a subprocess)
out=${OUT:?set OUT}; logs=$out/logs; mkdir -p "$logs"
pack() { tar czf "$out/gpu.tgz" -C "$out" logs && rm -r "$logs"; }  # one file back, whatever the count
trap pack EXIT
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.used --format=csv | tee "$logs/gpu.txt"
# The image's default compiler (/opt/gcc/bin/g++) links a static copy of libstdc++ into the extension, whose
# error messages then crash the process (SIGSEGV formatting a number in TORCH_CHECK; spectral_kernels refuses
# such a build, see kernels/native/__init__.py); the system g++ does not.
[ -x /usr/bin/g++ ] && export CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++
SPECTRAL_KERNELS_REQUIRE_NATIVE=1 SPECTRAL_KERNELS_CMAKE_ARGS=-DSPECTRAL_KERNELS_CUDA=ON \
  python3 setup.py build_ext --inplace >"$logs/build.log" 2>&1 \
  || { tail -40 "$logs/build.log"; exit 1; }
python3 -c "import spectral_kernels as sk; print(sk.backends())"
if [ "${TESTS:-tests}" != none ]; then
  eval "set -- ${TESTS:-tests}"  # shell words: TESTS='tests -k "a or b"' keeps the quoted expression whole
  timeout "${TEST_TIMEOUT:-270}" python3 -m pytest "$@" -q -n 12 -p no:cacheprovider --timeout 240 \
    -rfE --junitxml="$logs/tests.xml" >"$logs/tests.log" 2>&1
  echo "pytest rc=$?"; grep -E "^(FAILED|ERROR)|passed|failed" "$logs/tests.log" | cut -c1-300 | tail -60
fi
if [ "${BENCH:---quick}" != none ]; then
  timeout "${BENCH_TIMEOUT:-180}" python3 -m bench ${BENCH:---quick --backends cuda,triton} --out "$logs" \
    >"$logs/bench.log" 2>&1
  echo "bench rc=$?"; tail -60 "$logs/bench.log"
fi
if [ -n "${PROFILE:-}" ]; then
  timeout "${PROFILE_TIMEOUT:-200}" python3 -m bench.profile $PROFILE >"$logs/profile.log" 2>&1
  echo "profile rc=$?"; grep -A8 "^===" "$logs/profile.log"
fi
