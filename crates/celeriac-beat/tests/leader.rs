//! One leader among several beats, on the real local Redis (database 12, names of the test's own)
//! and on an SQLite file: an entry every 250 ms sent once per scheduled time, each with its own
//! id, while the leader is killed (its task aborted: no release, the lease lapses) and another
//! takes over within the lease term plus a third of it.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use celeriac_beat::{Beat, BeatConfig, Event, SystemClock};
use celeriac_core::Broker;
use tokio::sync::{mpsc, watch};

const LEASE: Duration = Duration::from_millis(900);

async fn three_beats_one_sender(broker: Arc<dyn Broker>) {
    let name = format!("t{}", uuid::Uuid::new_v4().simple());
    let queue = format!("beat-{name}");
    let text =
        format!("[[entry]]\nname = \"tick\"\ntask = \"celeriac.noop\"\nevery = \"250ms\"\nqueue = \"{queue}\"\n");
    let (stop_tx, stop) = watch::channel(false);
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel::<(usize, Event)>();
    let mut handles = Vec::new();
    for i in 0..3 {
        let schedule = celeriac_beat::parse(&text, "test.toml").unwrap();
        let config =
            BeatConfig { name: name.clone(), holder: format!("beat-{i}"), lease: LEASE, ..BeatConfig::default() };
        let beat = Beat::new(schedule, broker.clone(), Arc::new(SystemClock), config);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let out = ev_tx.clone();
        tokio::spawn(async move {
            while let Some(e) = rx.recv().await {
                let _ = out.send((i, e));
            }
        });
        let stop = stop.clone();
        handles.push(tokio::spawn(async move { beat.run(stop, Some(tx)).await.unwrap() }));
    }
    // Run, kill whoever leads after ~3 s, run on.
    let started = Instant::now();
    let mut leaders = Vec::new();
    let mut sent: Vec<(Instant, String, chrono::DateTime<chrono::Utc>)> = Vec::new();
    let mut killed = None;
    while started.elapsed() < Duration::from_secs(8) {
        let Ok(Some((i, e))) = tokio::time::timeout(Duration::from_millis(100), ev_rx.recv()).await else { continue };
        match e {
            Event::Leader => leaders.push(i),
            Event::Sent { task_id, scheduled, .. } => {
                assert_eq!(Some(i), leaders.last().copied(), "only the leader sends");
                sent.push((Instant::now(), task_id, scheduled));
            }
            Event::Follower => {}
        }
        if killed.is_none() && started.elapsed() > Duration::from_secs(3) {
            let leader = *leaders.last().expect("a leader within 3 s");
            handles[leader].abort();
            killed = Some((leader, Instant::now()));
        }
    }
    let _ = stop_tx.send(true);
    let (dead, at) = killed.expect("the leader was killed");
    assert!(leaders.len() >= 2 && leaders[leaders.len() - 1] != dead, "another beat took over: {leaders:?}");
    let ids: HashSet<&String> = sent.iter().map(|(_, id, _)| id).collect();
    assert_eq!(ids.len(), sent.len(), "every run has its own id: no run sent twice");
    let mut scheduled: Vec<_> = sent.iter().map(|(_, _, s)| *s).collect();
    scheduled.sort();
    // One run per period, but across the failover: the runs due while no one led are the
    // downtime `catch_up = "once"` sends one of.
    let bound = (LEASE + LEASE / 3).as_millis() as i64 + 250;
    let gaps: Vec<i64> = scheduled.windows(2).map(|w| (w[1] - w[0]).num_milliseconds()).filter(|g| *g != 250).collect();
    assert!(gaps.len() <= 1 && gaps.iter().all(|g| *g > 0 && *g <= bound), "gaps {gaps:?} in {scheduled:?}");
    let after_kill = sent.iter().find(|(t, _, _)| *t > at).map(|(t, _, _)| *t - at).expect("runs after the kill");
    assert!(after_kill < LEASE + LEASE / 3 + Duration::from_millis(1000), "took over in {after_kill:?}");
    // What was sent is in the queue, once each.
    let mut consumer = broker.consume(std::slice::from_ref(&queue), 1000).await.unwrap();
    let mut got = HashSet::new();
    while got.len() < sent.len() {
        let d = tokio::time::timeout(Duration::from_secs(5), consumer.next()).await.expect("a message").unwrap();
        assert!(got.insert(d.message.task_id().unwrap().to_string()), "a message twice");
        d.ack().await.unwrap();
    }
    assert_eq!(got.len(), ids.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_sends_on_redis() {
    let broker = celeriac_redis::RedisBroker::connect("redis://127.0.0.1:6379/12").await.unwrap();
    three_beats_one_sender(Arc::new(broker)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_sends_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let broker = celeriac_sqlite::SqliteBroker::open(&format!("sqlite://{}/b.db", dir.path().display())).unwrap();
    three_beats_one_sender(Arc::new(broker)).await;
}
