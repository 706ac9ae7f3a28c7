//! The backend survives a Redis restart: commands reconnect, and waiters subscribed before the
//! restart are woken by messages again. Runs a private `redis-server` on a free port (skipped,
//! with a note, when the binary is not installed), so it never disturbs the shared server.

use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use celeriac_core::{BackendError, ResultBackend, ResultMeta};
use celeriac_redis::RedisBackend;
use serde_json::json;

struct Server(Child);

impl Server {
    fn start(port: u16) -> Option<Server> {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .ok()?;
        let server = Server(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not listen on {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(server)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[tokio::test]
async fn survives_a_server_restart() {
    let port = free_port();
    let Some(server) = Server::start(port) else {
        eprintln!("redis-server is not installed; skipping the restart test");
        return;
    };
    let url = format!("redis://127.0.0.1:{port}/0");
    let backend = RedisBackend::connect(&url).await.unwrap();
    backend.store(&ResultMeta::success("before", json!(1))).await.unwrap();

    let started = Instant::now();
    let waiter = tokio::spawn({
        let backend = backend.clone();
        async move {
            let result = backend.wait("after", Some(Duration::from_secs(20))).await;
            (result, Instant::now())
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;

    drop(server);
    let err = backend.get("before").await.unwrap_err();
    assert!(matches!(err, BackendError::Unreachable { .. }), "{err}");
    let _server = Server::start(port).unwrap();
    // The first command after the restart reconnects transparently (the data is gone: the
    // server keeps nothing on disk).
    assert_eq!(backend.get("before").await.unwrap(), None);

    // The waiter reopens pub/sub when it next re-reads its result (within a second), so a result
    // stored after that wakes it at once rather than at its following re-read.
    tokio::time::sleep_until((started + Duration::from_millis(1300)).into()).await;
    assert!(!waiter.is_finished());
    let other = RedisBackend::connect(&url).await.unwrap();
    let meta = ResultMeta::success("after", json!(2));
    let stored_at = Instant::now();
    other.store(&meta).await.unwrap();
    let (result, returned_at) = waiter.await.unwrap();
    assert_eq!(result.unwrap(), meta);
    let latency = returned_at - stored_at;
    assert!(latency < Duration::from_millis(300), "woken {latency:?} after the store");
}
