# Sourced by the llama.cpp benches: the vendored llama.cpp tree of the PyPI `llama-cpp-python`
# sdist (the registries are all this workplace reaches) in $SRC, and
# `llamacpp_build NAME TARGET [CMAKE_FLAGS...]`, a static Release build of one CMake target in
# target/llama.cpp/build-NAME (kept; ~7 min on 2 cores). `llamacpp_x86_flags` holds the flags
# that restrict ggml to AVX2 + FMA + F16C (a -DGGML_NATIVE=ON build segfaulted in llama-bench on
# the AMX machine).
VERSION=0.3.36
SRC=target/llama.cpp/llama_cpp_python-$VERSION/vendor/llama.cpp
mkdir -p target/llama.cpp
if [ ! -d "$SRC" ]; then
  dl=$(mktemp -d)
  python3 -m pip download --no-deps --no-binary llama-cpp-python "llama-cpp-python==$VERSION" -d "$dl" >&2
  tar xzf "$dl"/llama_cpp_python-"$VERSION".tar.gz -C target/llama.cpp
  rm -rf "$dl"
fi
command -v cmake >/dev/null || python3 -m pip install -q cmake
llamacpp_x86_flags="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
llamacpp_build() { # name, target, cmake flags...
  local name=$1 target=$2; shift 2
  local dir=target/llama.cpp/build-$name
  [ -f "$dir/.built-$target" ] && return
  cmake -S "$SRC" -B "$dir" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DGGML_OPENMP=ON "$@" >&2
  cmake --build "$dir" --target "$target" -j "$(nproc)" >&2
  touch "$dir/.built-$target"
}
