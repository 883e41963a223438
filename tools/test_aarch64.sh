#!/usr/bin/env bash
# CI test: whittle's library built for 64-bit ARM (aarch64-unknown-linux-gnu) and its tests run
# under qemu-user, so the NEON kernels (f32 dot, packed-block dot, int16 dot) and the portable
# bodies are compiled, linted and checked against their independent references on every change,
# not only on the x86 machines that build whittle. The kernel tests run each kernel at every
# level the emulated CPU has (scalar, neon); the tiny-model, Hymba, Mamba, training-graph,
# distillation and MaskLLM suites run at the default level (neon); tests/levels.rs runs the real
# model at both levels (the same logits). Speed under emulation means nothing: ARM speed is not
# measured or asserted here.
#   bash tools/test_aarch64.sh          (installs the target, a cross gcc and qemu-user if missing)
set -euo pipefail
cd "$(dirname "$0")/.."
T=aarch64-unknown-linux-gnu
# The target's standard library comes from static.rust-lang.org, not a package registry: where
# it cannot be fetched the ARM checks are skipped, loudly, rather than failing the x86 run.
if ! rustup target list --installed | grep -qx "$T" && ! rustup target add "$T"; then
  echo "WARNING: cannot install the Rust target $T: the aarch64 build and tests did NOT run" >&2
  exit 0
fi
if ! command -v aarch64-linux-gnu-gcc >/dev/null || ! command -v qemu-aarch64 >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq crossbuild-essential-arm64 qemu-user >/dev/null
fi
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export CXX_aarch64_unknown_linux_gnu=aarch64-linux-gnu-g++
export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
cargo clippy --release --target "$T" -p whittle --all-targets -- -D warnings
cargo test --release --target "$T" -p whittle --lib
cargo test --release --target "$T" -p whittle --test tiny_model --test hymba --test mamba \
  --test train_graph --test distill --test maskllm
# The real model's logits at each level; its speed test is left out (emulated time is not
# an ARM CPU's: scalar decode from Q4_1 blocks took 3x the f32 decode's time under qemu,
# while on x86 CPUs it is the faster of the two; BENCHMARKS "Speed").
cargo test --release --target "$T" -p whittle --test levels -- \
  --skip decode_from_blocks_keeps_pace_with_f32_decode_at_every_level
