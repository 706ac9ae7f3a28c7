//! Beat on RabbitMQ: the leader lease and the last runs, in the broker itself.
//!
//! - **The lease** `name` is the exclusive queue `celeriac.lease.<name>`, declared on a
//!   connection of its own that the holder keeps open: RabbitMQ lets one connection at a time
//!   hold it (another's declare fails with RESOURCE_LOCKED) and deletes it when that connection
//!   closes, at once when the holder's process dies (its socket closes) and after the heartbeat
//!   timeout when its host vanishes. So a lease lasts as long as its holder's connection, not a
//!   term: renewing is checking that the connection is up.
//! - **The last runs** of a schedule are one message, the JSON object `{entry: Unix ms}`, in the
//!   durable queue `celeriac.beat.<schedule>` declared with `x-max-length: 1`: the leader
//!   publishes the whole record after each run and RabbitMQ keeps only the newest. Reading takes
//!   the message and gives it back (`basic.get`, then `basic.nack` with requeue).

use std::collections::HashMap;

use celeriac_core::BrokerError;
use lapin::options::{
    BasicGetOptions, BasicNackOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection};
use tokio::sync::Mutex;

use crate::broker::{connect, unreachable, AmqpBroker};

/// The lease connections this process holds: (lease name, holder) → connection.
#[derive(Default)]
pub(crate) struct Leases {
    held: Mutex<HashMap<(String, String), Connection>>,
}

fn lease_queue(name: &str) -> String {
    format!("celeriac.lease.{name}")
}

fn state_queue(schedule: &str) -> String {
    format!("celeriac.beat.{schedule}")
}

impl AmqpBroker {
    pub(crate) async fn amqp_lease(&self, name: &str, holder: &str) -> Result<bool, BrokerError> {
        let key = (name.to_string(), holder.to_string());
        let mut held = self.leases.held.lock().await;
        if let Some(conn) = held.get(&key) {
            if conn.status().connected() {
                return Ok(true);
            }
            held.remove(&key);
        }
        let conn = connect(self.config(), "celeriac beat lease").await?;
        let channel = conn.create_channel().await.map_err(|e| unreachable(self.config(), e))?;
        let declared = channel
            .queue_declare(
                lease_queue(name).as_str().into(),
                QueueDeclareOptions { exclusive: true, auto_delete: true, ..QueueDeclareOptions::default() },
                FieldTable::default(),
            )
            .await;
        match declared {
            Ok(_) => {
                held.insert(key, conn);
                Ok(true)
            }
            Err(e) if e.to_string().contains("RESOURCE_LOCKED") => {
                let _ = conn.close(200, "not the leader".into()).await;
                Ok(false)
            }
            Err(e) => {
                let _ = conn.close(200, "lease failed".into()).await;
                Err(unreachable(self.config(), e))
            }
        }
    }

    pub(crate) async fn amqp_release_lease(&self, name: &str, holder: &str) -> Result<(), BrokerError> {
        let conn = self.leases.held.lock().await.remove(&(name.to_string(), holder.to_string()));
        if let Some(conn) = conn {
            let _ = conn.close(200, "lease released".into()).await;
        }
        Ok(())
    }

    pub(crate) async fn amqp_last_runs(&self, schedule: &str) -> Result<HashMap<String, i64>, BrokerError> {
        let queue = state_queue(schedule);
        self.admin(|ch| async move {
            declare_state(&ch, &queue).await?;
            let Some(got) = ch.basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false }).await? else {
                return Ok(HashMap::new());
            };
            let runs = serde_json::from_slice::<HashMap<String, i64>>(&got.delivery.data).unwrap_or_default();
            got.delivery.acker.nack(BasicNackOptions { requeue: true, multiple: false }).await?;
            Ok(runs)
        })
        .await
    }

    pub(crate) async fn amqp_record_runs(&self, schedule: &str, runs: &[(String, i64)]) -> Result<(), BrokerError> {
        if runs.is_empty() {
            return Ok(());
        }
        let mut all = self.amqp_last_runs(schedule).await?;
        for (entry, at) in runs {
            let slot = all.entry(entry.clone()).or_insert(*at);
            *slot = (*slot).max(*at);
        }
        let body = serde_json::to_vec(&all).unwrap_or_default();
        let queue = state_queue(schedule);
        self.admin(|ch| async move {
            declare_state(&ch, &queue).await?;
            ch.confirm_select(ConfirmSelectOptions::default()).await?;
            let props = BasicProperties::default().with_delivery_mode(2).with_content_type("application/json".into());
            let confirm = ch
                .basic_publish("".into(), queue.as_str().into(), BasicPublishOptions::default(), &body, props)
                .await?;
            confirm.await?;
            Ok(())
        })
        .await
    }
}

async fn declare_state(ch: &lapin::Channel, queue: &str) -> Result<(), lapin::Error> {
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongInt(1));
    ch.queue_declare(queue.into(), QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() }, args)
        .await?;
    Ok(())
}
