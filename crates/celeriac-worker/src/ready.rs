//! The ready reserve: validated requests waiting for a slot, oldest first, and how a prefork
//! supervisor keeps them small.
//!
//! Under a backlog the reserve holds most of the prefetch window (by default up to
//! [`crate::DEFAULT_MAX_PREFETCH_PYTHON`] with Python children, 1,024 with Rust ones, and as many as
//! `--max-prefetch` allows). A validated [`Request`] is large: its message's
//! header map allocates per entry, key and value, and the typed headers and decoded body copy
//! much of it again: about 5.5 KB a request, most of a prefork supervisor's memory at a drain's
//! peak (docs/benchmarks.md, "Supervisor RSS"). So a reserve made with `pack` set keeps the
//! requests behind its first [`KEPT`] as *packed*: the message as one allocation
//! ([`Message::pack`], about 1 KB for a Celery task), the delivery's handle, the task, and the
//! request's bookkeeping (its `inspect` entry, its metrics), with the typed headers and body
//! dropped. A packed request is unpacked as it leaves the reserve: the message back as it was
//! received ([`Message::unpack`]), its headers and body read again as `request::prepare` read
//! them. Nothing about the request changes while it is packed: it was validated, counted,
//! evented and tracked when it arrived, and `inspect reserved`, revokes, the give-back and
//! shutdown see it as before.
//!
//! Packing costs a few microseconds of CPU per request that waits (writing the header map as
//! JSON and reading it back): worth it where memory is the measure (a prefork supervisor, whose
//! tasks cost a round trip to a child anyway), not for the async pool, whose tasks may take
//! microseconds; the worker packs only with a prefork pool.

use std::collections::VecDeque;
use std::sync::Arc;

use celeriac_core::broker::Delivery;
use celeriac_core::{Message, Task};

use crate::request::Request;

/// How many requests at the front of a packing reserve are kept as they are: the next to start.
pub const KEPT: usize = 8;

/// The ready reserve (see the module docs).
pub(crate) struct ReadyQueue {
    items: VecDeque<Waiting>,
    pack: bool,
}

/// One request in the reserve.
enum Waiting {
    Prepared(Box<Request>),
    Packed(Box<Packed>),
}

/// A request kept small while it waits: everything but its message, typed headers and body,
/// which are read again from `message` when it leaves the reserve.
struct Packed {
    /// The delivery, its message taken out (empty header map, no body).
    delivery: Delivery,
    /// The message, [`Message::pack`]ed.
    message: Box<[u8]>,
    /// Its task id, for the log lines of a give-back.
    id: Box<str>,
    task: Arc<dyn Task>,
    reserved: crate::metrics::Reserved,
    tracked: Option<crate::state::Tracked>,
    rate_turn_taken: bool,
}

impl ReadyQueue {
    /// An empty reserve; `pack`: keep the requests behind the first [`KEPT`] packed.
    pub fn new(pack: bool) -> Self {
        ReadyQueue { items: VecDeque::new(), pack }
    }

    /// Requests waiting.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether none waits.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Add a request at the back.
    pub fn push_back(&mut self, req: Request) {
        let item = if self.pack && self.items.len() >= KEPT {
            match pack(req) {
                Ok(packed) => Waiting::Packed(Box::new(packed)),
                Err(req) => Waiting::Prepared(req),
            }
        } else {
            Waiting::Prepared(Box::new(req))
        };
        self.items.push_back(item);
    }

    /// The oldest request, unpacked. A packed request whose message cannot be read back (a bug:
    /// the bytes are the worker's own) is logged and its delivery requeued, and the next one is
    /// taken.
    pub async fn pop_front(&mut self) -> Option<Request> {
        while let Some(item) = self.items.pop_front() {
            match item {
                Waiting::Prepared(req) => return Some(*req),
                Waiting::Packed(p) => {
                    let task = p.task.clone();
                    match unpack(*p) {
                        Ok(req) => return Some(req),
                        Err(failed) => {
                            let (delivery, id, reason) = *failed;
                            let name = task.name();
                            tracing::error!(task_id = %id, task_name = %name, error = %reason, "cannot read back a request kept packed while it waited; requeueing it");
                            if let Err(e) = delivery.reject(true).await {
                                tracing::warn!(task_id = %id, task_name = %name, error = %e, "could not requeue; the broker will redeliver it after its lease");
                            }
                        }
                    }
                }
            }
        }
        None
    }

    /// Give every waiting request back to the broker, unstarted (`Delivery::release`), oldest
    /// first; how many. `one_by_one`: each release finishes before the next starts (shutdown, as
    /// a transport may put each back at the head of its queue); else all at once (a give-back).
    pub async fn release_all(&mut self, one_by_one: bool) -> usize {
        let n = self.items.len();
        let releases = self.items.drain(..).map(|item| async move {
            match item {
                Waiting::Prepared(req) => req.release().await,
                Waiting::Packed(p) => {
                    if let Err(e) = p.delivery.release().await {
                        tracing::warn!(task_id = %p.id, task_name = %p.task.name(), error = %e, "could not give the task back; the broker will redeliver it after its lease");
                    }
                }
            }
        });
        if one_by_one {
            for release in releases {
                release.await;
            }
        } else {
            futures::future::join_all(releases).await;
        }
        n
    }
}

/// The message that stands in for a packed one in its delivery: allocates nothing.
fn empty_message() -> Message {
    Message {
        headers: serde_json::Map::new(),
        properties: celeriac_core::protocol::Properties {
            correlation_id: None,
            content_type: String::new(),
            content_encoding: String::new(),
            delivery_mode: 0,
            priority: None,
            reply_to: None,
            expiration: None,
        },
        body: Vec::new(),
    }
}

/// The request packed, or as it was if its message cannot be packed (never for a message read
/// from JSON; logged).
fn pack(mut req: Request) -> Result<Packed, Box<Request>> {
    let message = match req.delivery.message.pack() {
        Ok(bytes) => bytes.into_boxed_slice(),
        Err(e) => {
            tracing::warn!(task_id = %req.headers.id, task_name = %req.headers.task, error = %e, "keeping a waiting request unpacked");
            return Err(Box::new(req));
        }
    };
    req.delivery.message = empty_message();
    let Request { delivery, headers, body: _, task, reserved, tracked, rate_turn_taken, deferred, chain_stopped } = req;
    // Set only while a task runs; a request that waits has neither.
    debug_assert!(deferred.is_empty() && !chain_stopped);
    Ok(Packed { message, delivery, id: headers.id.into_boxed_str(), task, reserved, tracked, rate_turn_taken })
}

/// What is left of a request that cannot be unpacked: its delivery, id and why not.
type Unreadable = Box<(Delivery, Box<str>, String)>;

/// The request again, or what is left of it.
fn unpack(p: Packed) -> Result<Request, Unreadable> {
    let Packed { mut delivery, message, id, task, reserved, tracked, rate_turn_taken } = p;
    let read = Message::unpack(&message).and_then(|m| {
        let headers = m.task_headers()?;
        let body = m.task_body()?;
        Ok((m, headers, body))
    });
    match read {
        Ok((message, headers, body)) => {
            delivery.message = message;
            Ok(Request {
                delivery,
                headers,
                body,
                task,
                reserved,
                tracked,
                rate_turn_taken,
                deferred: Vec::new(),
                chain_stopped: false,
            })
        }
        Err(e) => Err(Box::new((delivery, id, e.to_string()))),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use celeriac_core::{Acker, BrokerError, TaskBody, TaskContext, TaskHeaders, TaskOptions};
    use serde_json::{json, Map, Value};
    use std::sync::Mutex;

    struct Noop;
    impl Task for Noop {
        fn name(&self) -> &str {
            "t.noop"
        }
        fn options(&self) -> TaskOptions {
            TaskOptions::default()
        }
        fn call(&self, _: TaskContext, _: Vec<Value>, _: Map<String, Value>) -> celeriac_core::task::TaskFuture {
            Box::pin(async { Ok(Value::Null) })
        }
    }

    /// Records what was done with each delivery, by its tag.
    struct Recorder(u32, Arc<Mutex<Vec<String>>>);
    #[async_trait::async_trait]
    impl Acker for Recorder {
        async fn ack(self: Box<Self>) -> Result<(), BrokerError> {
            self.1.lock().unwrap().push(format!("ack {}", self.0));
            Ok(())
        }
        async fn reject(self: Box<Self>, requeue: bool) -> Result<(), BrokerError> {
            self.1.lock().unwrap().push(format!("reject {} {requeue}", self.0));
            Ok(())
        }
        async fn release(self: Box<Self>) -> Result<(), BrokerError> {
            self.1.lock().unwrap().push(format!("release {}", self.0));
            Ok(())
        }
    }

    /// A request for task `t.noop`, id `id-<i>`, whose delivery logs what is done with it.
    pub(crate) fn request(i: u32, log: &Arc<Mutex<Vec<String>>>) -> Request {
        let mut headers = TaskHeaders::new("t.noop", format!("id-{i}"));
        headers.retries = i;
        let body = TaskBody {
            args: vec![json!(i), json!(1.50)],
            kwargs: json!({"k": "é", "n": i}).as_object().unwrap().clone(),
            embed: Default::default(),
        };
        let mut message = Message::new_task(&headers, &body, Some(3), Some("reply".into())).unwrap();
        message.headers.insert("x-user".into(), json!({"nested": [1, null]}));
        let delivery = Delivery::new(message, "q", 1, Box::new(Recorder(i, log.clone()))).with_route("ex", "rk");
        Request {
            delivery,
            headers,
            body,
            task: Arc::new(Noop),
            reserved: crate::metrics::Reserved::untracked(),
            tracked: None,
            rate_turn_taken: i.is_multiple_of(2),
            deferred: Vec::new(),
            chain_stopped: false,
        }
    }

    #[tokio::test]
    async fn packed_requests_come_out_as_they_went_in_and_in_order() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut ready = ReadyQueue::new(true);
        let n = KEPT as u32 + 12;
        for i in 0..n {
            ready.push_back(request(i, &log));
        }
        assert_eq!(ready.len(), n as usize);
        let packed = ready.items.iter().filter(|w| matches!(w, Waiting::Packed(_))).count();
        assert_eq!(packed, n as usize - KEPT, "all but the first {KEPT} are packed");
        for i in 0..n {
            let got = ready.pop_front().await.expect("a request");
            let want = request(i, &log);
            assert_eq!(got.delivery.message, want.delivery.message, "request {i}");
            assert_eq!(got.headers, want.headers);
            assert_eq!(got.body.args, want.body.args);
            assert_eq!(got.body.kwargs, want.body.kwargs);
            assert_eq!(
                (&got.delivery.queue, &got.delivery.exchange, &got.delivery.routing_key, got.delivery.delivery_count),
                (&want.delivery.queue, &want.delivery.exchange, &want.delivery.routing_key, 1)
            );
            assert_eq!(got.rate_turn_taken, want.rate_turn_taken);
            // Its own delivery handle came back with it.
            got.delivery.ack().await.unwrap();
            assert_eq!(log.lock().unwrap().last().unwrap(), &format!("ack {i}"));
        }
        assert!(ready.pop_front().await.is_none());
    }

    #[tokio::test]
    async fn a_reserve_that_does_not_pack_keeps_requests_whole_and_releases_in_order() {
        let log = Arc::new(Mutex::new(Vec::new()));
        for pack in [false, true] {
            log.lock().unwrap().clear();
            let mut ready = ReadyQueue::new(pack);
            for i in 0..20 {
                ready.push_back(request(i, &log));
            }
            if !pack {
                assert!(ready.items.iter().all(|w| matches!(w, Waiting::Prepared(_))));
            }
            assert_eq!(ready.release_all(true).await, 20);
            assert!(ready.is_empty());
            let want: Vec<String> = (0..20).map(|i| format!("release {i}")).collect();
            assert_eq!(*log.lock().unwrap(), want, "pack {pack}");
        }
    }
}
