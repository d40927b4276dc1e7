#!/usr/bin/env bash
# The wheels benchmarks/gpu_check.sh needs on a GPU machine with no network, run HERE first:
#
#   bash benchmarks/gpu_wheels.sh                 # python 3.12 wheels into .whl/ (ignored)
#   bash benchmarks/gpu_wheels.sh --python 3.11 --dest /tmp/whl311   # a set for this machine
#
# The machine's image (python3 3.12 with torch 2.11 CUDA, numpy, pyyaml, psutil, tqdm,
# pillow, matplotlib, pyarrow, tokenizers, ninja, pytest, hypothesis, setuptools, pandas,
# scipy, scikit-learn, flask's werkzeug/jinja2/click, requests, protobuf, ...; the list is
# /work/.library/device/KINDS.md) lacks exactly the wheels below: what the `turnout train
# --launcher torchrun` path, the benchmarks and their imports need, and what those need in
# turn, minus the image's. Ray is left out on purpose (its wheel alone is ~70 MB of the
# 64 MiB that may travel): gpu_check.sh trains through torchrun. Pinned to the set this
# script was rehearsed with; the direct dependencies stay inside pyproject.toml's bounds.
# Every old wheel in the destination is removed first (two versions of one name stop pip).
# Prints each wheel, the total and the working tree's size; exits 1 over 56 MiB of wheels
# or 64 MiB in all (what may travel to the device machine in one call).
#
# Environment: PYTHON  the pip to download with and the interpreter that builds DeepSpeed's
# wheel (it needs torch and setuptools): .venv/bin/python when there, else python3.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYV=3.12
DEST=.whl
MAX_MIB=56
while (($#)); do
  case $1 in
    --python) PYV=$2 && shift 2 ;;
    --dest) DEST=$2 && shift 2 ;;
    *) echo "usage: $0 [--python X.Y] [--dest DIR]" >&2 && exit 2 ;;
  esac
done
if [[ -z ${PYTHON:-} ]]; then
  PYTHON=python3
  [[ -x .venv/bin/python ]] && PYTHON=.venv/bin/python
fi

WHEELS=(
  # turnout's own dependencies (pyproject.toml) that the image lacks
  "omegaconf==2.4.0"              # >=2.3: every config is read through it (turnout/config)
  "mlflow==3.17.2"                # >=3.17,<4: tracking (trainer/tracking*.py), sqlite store
  # DeepSpeed's (built below: PyPI has no wheel of it), for parallel/ and bench moe_layer
  "hjson==3.1.0"                  # deepspeed: its config parser
  "pydantic==2.14.4"              # deepspeed's config models; mlflow-skinny, fastapi
  "pydantic-core==2.50.5"         # pydantic (== pinned by it)
  "annotated-types==0.8.0"        # pydantic
  "typing-inspection==0.4.5"      # pydantic
  "typing-extensions==4.16.0"     # in the image, carried for the version: pydantic needs >=4.16
  # mlflow's own (== pinned by it): the client, the tracing API
  "mlflow-skinny==3.17.2"
  "mlflow-tracing==3.17.2"
  # the sqlite tracking store: SQLAlchemy, and alembic's schema migrations
  "sqlalchemy==2.1.9"             # mlflow
  "alembic==1.20.1"               # mlflow
  "mako==1.4.3"                   # alembic
  # mlflow's server side, which `import mlflow` and its store modules pull in
  "flask==3.1.3"                  # mlflow (werkzeug, jinja2, click: in the image)
  "flask-cors==6.0.5"             # mlflow
  "blinker==1.9.0"                # flask
  "itsdangerous==2.2.0"           # flask
  "graphene==3.4.3"               # mlflow (its GraphQL API)
  "graphql-core==3.2.14"          # graphene
  "graphql-relay==3.2.0"          # graphene
  "gunicorn==26.2.0"              # mlflow
  "huey==3.5.4"                   # mlflow (its job queue)
  "docker==7.2.0"                 # mlflow
  "skops==0.16.0"                 # mlflow (model serialisation)
  "prettytable==3.19.0"           # skops
  "wcwidth==0.9.5"                # prettytable
  "cryptography==50.0.2"          # mlflow, google-auth
  "cffi==2.1.1"                   # cryptography
  "pycparser==3.12"               # cffi
  # mlflow-skinny's and mlflow-tracing's
  "cachetools==7.3.3"
  "databricks-sdk==0.167.0"
  "google-auth==2.63.1"           # databricks-sdk
  "pyasn1-modules==0.4.2"         # google-auth
  "pyasn1==0.6.5"                 # pyasn1-modules
  "fastapi==0.165.0"              # mlflow-skinny (anyio, annotated-doc: in the image)
  "starlette==1.10.0"             # mlflow-skinny, fastapi
  "uvicorn==0.55.0"               # mlflow-skinny (h11: in the image)
  "gitpython==3.2.1"              # mlflow-skinny
  "gitdb==4.0.12"                 # gitpython
  "smmap==5.0.3"                  # gitdb
  "importlib-metadata==9.1.0"     # mlflow-skinny
  "python-dotenv==1.2.4"          # mlflow-skinny
  "sqlparse==0.6.1"               # mlflow-skinny
  "opentelemetry-api==1.45.2"     # mlflow-skinny, mlflow-tracing (traces)
  "opentelemetry-sdk==1.45.2"
  "opentelemetry-proto==1.45.2"
  "opentelemetry-semantic-conventions==0.66b2"  # opentelemetry-sdk
)
# DeepSpeed: PyPI has only its sdist; built here as a py3-none-any wheel with no ops
# compiled (DS_BUILD_OPS=0: it JIT-builds one if asked; the MoE layer needs none).
DEEPSPEED="deepspeed==0.19.8" # >=0.19,<0.20 (pyproject.toml)

mkdir -p "$DEST"
rm -f "$DEST"/*.whl
pip=("$PYTHON" -m pip --disable-pip-version-check)
echo "gpu_wheels: ${#WHEELS[@]} wheels for CPython $PYV, x86-64 Linux, into $DEST"
"${pip[@]}" download -q --no-deps --only-binary=:all: --python-version "$PYV" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d "$DEST" "${WHEELS[@]}"
echo "gpu_wheels: building $DEEPSPEED with $PYTHON"
DS_BUILD_OPS=0 "${pip[@]}" wheel -q --no-deps --no-build-isolation -w "$DEST" "$DEEPSPEED"
ds=("$DEST"/deepspeed-*-py3-none-any.whl)
[[ -f ${ds[0]} ]] || { echo "gpu_wheels: no py3-none-any DeepSpeed wheel in $DEST" >&2; exit 1; }

# One wheel per name, all of them there.
n=$(find "$DEST" -maxdepth 1 -type f -name '*.whl' | wc -l)
want=$((${#WHEELS[@]} + 1))
if ((n != want)); then
  echo "gpu_wheels: $n wheels in $DEST, expected $want" >&2
  exit 1
fi

wheel_bytes=$(find "$DEST" -maxdepth 1 -type f -name '*.whl' -printf '%s\n' | awk '{s += $1} END {print s}')
tree_bytes=$( (git ls-files -z && git ls-files -z --others --exclude-standard) |
  xargs -0 -r stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
find "$DEST" -maxdepth 1 -type f -name '*.whl' -printf '%s %f\n' | sort -rn |
  awk '{printf "  %7.2f MiB  %s\n", $1 / 1048576, $2}'
mib() { awk -v b="$1" 'BEGIN {printf "%.1f", b / 1048576}'; }
echo "gpu_wheels: $n wheels, $(mib "$wheel_bytes") MiB (limit $MAX_MIB); the working tree" \
  "$(mib "$tree_bytes") MiB; together $(mib $((wheel_bytes + tree_bytes))) MiB of the 64 MiB" \
  "that may travel"
if ((wheel_bytes > MAX_MIB * 1048576 || wheel_bytes + tree_bytes > 64 * 1048576)); then
  echo "gpu_wheels: too large" >&2
  exit 1
fi
[[ $DEST == .whl ]] && echo "gpu_wheels: now run gpu_check.sh on the device machine with carry [\".whl\"]"
exit 0
