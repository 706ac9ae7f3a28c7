#!/usr/bin/env bash
# The test command: what a newcomer runs and what CI runs (.ci/run calls this).
#
#   scripts/test.sh
#
# 1. checks the tools it needs and fails with a clear message when one is missing;
# 2. starts Redis and RabbitMQ on loopback if they are not running, and waits until they answer;
# 3. installs Debian's chromium and chromium-driver when missing (the dashboard's browser test);
# 4. creates the Python virtualenv with real Celery under target/pyenv (interop tooling);
# 5. cargo fmt --check, clippy with warnings as errors, every test of the workspace, and builds
#    the benchmarks and examples (they must compile; running them is `cargo bench`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n==> %s\n' "$*"; }
die() { printf 'scripts/test.sh: %s\n' "$*" >&2; exit 1; }

step "checking tools"
for tool in cargo rustc python3; do
    command -v "$tool" >/dev/null 2>&1 || die "'$tool' is required but not on PATH"
done
cargo fmt --version >/dev/null 2>&1 || die "rustfmt is missing (rustup component add rustfmt)"
cargo clippy --version >/dev/null 2>&1 || die "clippy is missing (rustup component add clippy)"

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for() { # name, seconds, command...
    local name=$1 secs=$2; shift 2
    local deadline=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        (( SECONDS < deadline )) || die "$name did not answer within ${secs}s"
        sleep 0.5
    done
}

step "services"
if ! port_open 6379; then
    command -v redis-server >/dev/null 2>&1 || die "Redis is not running on 127.0.0.1:6379 and redis-server is not installed"
    echo "starting Redis"
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >/dev/null
fi
wait_for "Redis on 127.0.0.1:6379" 30 port_open 6379
echo "Redis: up"
if ! port_open 5672; then
    command -v rabbitmq-server >/dev/null 2>&1 || die "RabbitMQ is not running on 127.0.0.1:5672 and rabbitmq-server is not installed"
    echo "starting RabbitMQ"
    rabbitmq-server -detached >/dev/null 2>&1 || true
fi
wait_for "RabbitMQ on 127.0.0.1:5672" 120 port_open 5672
echo "RabbitMQ: up"

step "headless Chromium for the dashboard's browser test"
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
    command -v apt-get >/dev/null 2>&1 || die "chromium and chromedriver are missing and apt-get is not available to install them"
    echo "installing chromium and chromium-driver"
    apt-get install -y chromium chromium-driver >/dev/null || { apt-get update >/dev/null && apt-get install -y chromium chromium-driver >/dev/null; } \
        || die "could not install chromium and chromium-driver"
fi
echo "Chromium: $(chromedriver --version | cut -d' ' -f1-2)"

step "python virtualenv with Celery (target/pyenv)"
scripts/python-env.sh >/dev/null

step "format"
cargo fmt --all -- --check || die "code is not formatted: run cargo fmt --all"

step "clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "tests"
cargo test --workspace --locked

step "benchmarks and examples compile"
cargo bench --workspace --no-run --locked
cargo build --workspace --examples --locked

step "all green"
