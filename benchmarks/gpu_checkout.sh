# Sourced by the GPU scripts: run from the checkout's root without installing (PYTHONPATH), with the interpreter
# PYTHON names (default python3), and only where JAX sees a GPU.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}
"$py" -c 'import jax; assert jax.default_backend() == "gpu", f"no GPU for jax: {jax.devices()}"' || exit 1
