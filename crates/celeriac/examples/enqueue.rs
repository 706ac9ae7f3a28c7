//! A Rust service enqueueing work and reading results.
//!
//! ```text
//! cargo run -p celeriac --example worker_binary -- worker &      # a worker with the tasks
//! cargo run -p celeriac --example enqueue
//! ```

use std::time::Duration;

use celeriac::{Client, SendOptions};
use serde_json::{json, Map};

// Linking the task gives a typed call: `thumbnail::delay(&client, ...)`. A service that does not
// link the task's code sends it by name instead (below).
#[celeriac::task(name = "images.thumbnail", queue = "images")]
async fn thumbnail(path: String, size: u32) -> String {
    format!("{path} -> {size}px")
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let broker = std::env::var("CELERIAC_BROKER_URL").unwrap_or_else(|_| "sqlite://celeriac.db".into());
    let client = Client::connect(&broker, None).await?;

    // Typed, with the task's own default queue ("images").
    let typed = thumbnail::delay(&client, "cat.png".into(), 128).await?;
    // Typed, with options.
    let later = thumbnail::s("dog.png".into(), 64).countdown(2.0).apply_async(&client).await?;
    // By name, as Celery's send_task.
    let by_name =
        client.send_task("celeriac.add", vec![json!(2), json!(3)], Map::new(), SendOptions::default()).await?;

    let timeout = Some(Duration::from_secs(30));
    println!("{} -> {}", typed.id(), typed.get(timeout).await?);
    println!("{} -> {}", later.id(), later.get(timeout).await?);
    println!("{} -> {}", by_name.id(), by_name.get_as::<i64>(timeout).await?);
    Ok(())
}
