//! Workflows from Rust: a chain, a group, a chord and callbacks, run by any celeriac (or
//! Python Celery) worker that has the tasks.
//!
//! ```text
//! celeriac worker --broker redis://127.0.0.1:6379/0 --result-backend redis://127.0.0.1:6379/0 -Q celery &
//! CELERIAC_BROKER_URL=redis://127.0.0.1:6379/0 cargo run -p celeriac --example canvas
//! ```
//!
//! Chords need a result backend that joins them (Redis or SQLite); the broker's own SQLite file
//! is one, so the example also runs with no configuration against `celeriac worker`.

use std::time::Duration;

use celeriac::canvas::{chain, chord, group};
use celeriac::{Client, Signature};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let broker = std::env::var("CELERIAC_BROKER_URL").unwrap_or_else(|_| "sqlite://celeriac.db".into());
    // The result backend: the broker's own (SQLite), or a redis:// broker's database.
    let backend = broker.starts_with("redis://").then_some(broker.as_str());
    let client = Client::connect(&broker, backend).await?;
    let timeout = Some(Duration::from_secs(30));
    let add = |x: i64, y: i64| Signature::new("celeriac.add").arg(x).arg(y);

    // ((1 + 2) + 10) + 100: each step gets the previous result as its first argument.
    let sum = chain([add(1, 2), Signature::new("celeriac.add").arg(10), Signature::new("celeriac.add").arg(100)])
        .apply_async(&client)
        .await?;
    println!("chain: {}", sum.get(timeout).await?);

    // The tasks of a group run in parallel; their results come back in order.
    let parts = group((0..5).map(|i| add(i, i))).apply_async(&client).await?;
    println!("group: {}", serde_json::Value::Array(parts.as_group().expect("a group").get(timeout).await?));

    // A chord: the header's results, in order, go to the body.
    let total = chord((0..100).map(|i| add(i, i)), Signature::new("celeriac.tsum")).apply_async(&client).await?;
    println!("chord: {}", total.get(timeout).await?);

    // A callback gets the result; an errback would get the id of a failed task.
    let linked = add(2, 3).link(Signature::new("celeriac.echo")).link_error(Signature::new("celeriac.echo"));
    let r = client.apply(linked).await?;
    println!(
        "link: {} (children: {:?})",
        r.get(timeout).await?,
        r.children().await?.iter().map(|c| c.id().to_string()).collect::<Vec<_>>()
    );
    Ok(())
}
