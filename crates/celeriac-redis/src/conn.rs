//! Connections to Redis with bounded waits, shared by the result backend and the broker.
//!
//! Commands go through a [`ConnectionManager`]: one multiplexed connection that reconnects by
//! itself after a failure (a couple of quick retries, then the error is returned and the next
//! command tries again). Every wait is bounded: connecting (TCP and handshake) by the URL's
//! `connect_timeout`, each answer by its `command_timeout`, and a whole operation, a reconnection
//! included, by [`Redis::run`]'s deadline, so a dead or silent server gives an error, never a hang.
//! Pub/sub needs a connection of its own ([`Redis::pubsub`]), and so do blocking commands such as
//! the broker's `BRPOP` ([`Redis::blocking_connection`]): on a shared multiplexed connection a
//! blocked command would hold up every command queued behind it, and redis-rs's default response
//! timeout (500 ms) would cut it short.

use std::future::Future;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection, PubSub};
use redis::{AsyncConnectionConfig, Client, ErrorKind, RedisError, RetryMethod};
use tokio::sync::OnceCell;

use crate::url::RedisUrl;

/// Reconnection attempts the manager makes before failing a command (each bounded by the connect
/// timeout); the next command starts over.
const RECONNECT_RETRIES: usize = 2;

/// Why a Redis operation failed, sorted the way callers map it onto their error types.
#[derive(Debug, Clone, PartialEq)]
pub enum Failure {
    /// The server could not be reached, did not answer in time, refused the handshake, or said
    /// to try again later (`LOADING` after a restart, `TRYAGAIN`, `MASTERDOWN`).
    Unreachable(String),
    /// The server answered with an error (wrong type, no permission, ...).
    Command(String),
}

impl Failure {
    pub(crate) fn from_redis(e: &RedisError) -> Self {
        let reason = e.to_string();
        if e.is_io_error()
            || e.is_timeout()
            || e.is_connection_refusal()
            || e.is_connection_dropped()
            || e.kind() == ErrorKind::AuthenticationFailed
            || matches!(e.retry_method(), RetryMethod::WaitAndRetry)
        {
            Failure::Unreachable(reason)
        } else {
            Failure::Command(reason)
        }
    }
}

/// A Redis server: a lazily opened, self-healing command connection plus a way to open pub/sub
/// connections, all with bounded waits.
pub struct Redis {
    client: Client,
    manager: OnceCell<ConnectionManager>,
    connect_timeout: Duration,
    command_timeout: Duration,
}

impl Redis {
    /// Prepare a connection to the server the URL names (nothing is sent yet).
    pub fn new(url: &RedisUrl) -> Result<Self, String> {
        let client = Client::open(url.connection_info()?).map_err(|e| e.to_string())?;
        Ok(Redis {
            client,
            manager: OnceCell::new(),
            connect_timeout: url.connect_timeout,
            command_timeout: url.command_timeout,
        })
    }

    /// The longest one operation may take: a connection attempt and an answer.
    pub fn deadline(&self) -> Duration {
        self.connect_timeout + self.command_timeout
    }

    /// Connect now (if not yet connected) and check the server answers `PING`.
    pub async fn ping(&self) -> Result<(), Failure> {
        self.run(|mut conn| async move { redis::cmd("PING").query_async::<()>(&mut conn).await }).await
    }

    /// Run one operation on the command connection, connecting first if needed, within
    /// [`Redis::deadline`]. An operation that fails because the connection dropped (the server
    /// restarted, say) is tried once more on a fresh connection, so callers only see the error
    /// when the server is really gone: every operation given here must be safe to repeat.
    pub async fn run<T, F, Fut>(&self, op: F) -> Result<T, Failure>
    where
        F: Fn(ConnectionManager) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        let deadline = self.deadline();
        let work = async {
            match op(self.manager().await?).await {
                Err(e) if e.is_unrecoverable_error() || e.is_connection_dropped() => {
                    tracing::debug!(error = %e, "Redis connection dropped; retrying on a new one");
                    op(self.manager().await?).await.map_err(|e| Failure::from_redis(&e))
                }
                result => result.map_err(|e| Failure::from_redis(&e)),
            }
        };
        tokio::time::timeout(deadline, work)
            .await
            .unwrap_or_else(|_| Err(Failure::Unreachable(format!("no answer within {deadline:?}"))))
    }

    /// Run one operation on the command connection exactly once, within [`Redis::deadline`]: for
    /// operations that must not be repeated when their answer is lost (popping messages).
    pub async fn run_once<T, Fut>(&self, op: impl FnOnce(ConnectionManager) -> Fut) -> Result<T, Failure>
    where
        Fut: Future<Output = Result<T, RedisError>>,
    {
        let deadline = self.deadline();
        let work = async { op(self.manager().await?).await.map_err(|e| Failure::from_redis(&e)) };
        tokio::time::timeout(deadline, work)
            .await
            .unwrap_or_else(|_| Err(Failure::Unreachable(format!("no answer within {deadline:?}"))))
    }

    /// Open a connection of its own for blocking commands whose answer may take up to
    /// `longest_block` (`BRPOP key... timeout`): its response timeout is that plus the command
    /// timeout, and connecting is bounded by the connect timeout. The caller owns it and must not
    /// share it with other commands; after any error it should be dropped, as an answer that came
    /// too late is lost with it.
    pub async fn blocking_connection(&self, longest_block: Duration) -> Result<MultiplexedConnection, Failure> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(Some(longest_block + self.command_timeout));
        let limit = self.connect_timeout;
        match tokio::time::timeout(limit, self.client.get_multiplexed_async_connection_with_config(&config)).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(e)) => Err(Failure::from_redis(&e)),
            Err(_) => Err(Failure::Unreachable(format!("could not connect within {limit:?}"))),
        }
    }

    /// The command connection, opened on first use (a failed attempt is retried by the next call).
    async fn manager(&self) -> Result<ConnectionManager, Failure> {
        let manager = self
            .manager
            .get_or_try_init(|| async {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(self.connect_timeout))
                    .set_response_timeout(Some(self.command_timeout))
                    .set_number_of_retries(RECONNECT_RETRIES)
                    .set_min_delay(Duration::from_millis(100))
                    .set_max_delay(Duration::from_secs(1));
                let limit = self.connect_timeout;
                match tokio::time::timeout(limit, ConnectionManager::new_with_config(self.client.clone(), config)).await
                {
                    Ok(Ok(manager)) => {
                        tracing::debug!(addr = %self.client.get_connection_info().addr(), "connected to Redis");
                        Ok(manager)
                    }
                    Ok(Err(e)) => Err(Failure::from_redis(&e)),
                    Err(_) => Err(Failure::Unreachable(format!("could not connect within {limit:?}"))),
                }
            })
            .await?;
        Ok(manager.clone())
    }

    /// Open a new pub/sub connection, within the connect timeout.
    pub async fn pubsub(&self) -> Result<PubSub, Failure> {
        let limit = self.connect_timeout;
        match tokio::time::timeout(limit, self.client.get_async_pubsub()).await {
            Ok(Ok(pubsub)) => Ok(pubsub),
            Ok(Err(e)) => Err(Failure::from_redis(&e)),
            Err(_) => Err(Failure::Unreachable(format!("could not connect within {limit:?}"))),
        }
    }

    /// Run a pub/sub command (SUBSCRIBE, UNSUBSCRIBE) within the command timeout.
    pub async fn pubsub_command<Fut>(&self, command: Fut) -> Result<(), Failure>
    where
        Fut: Future<Output = Result<(), RedisError>>,
    {
        let limit = self.command_timeout;
        match tokio::time::timeout(limit, command).await {
            Ok(result) => result.map_err(|e| Failure::from_redis(&e)),
            Err(_) => Err(Failure::Unreachable(format!("no answer within {limit:?}"))),
        }
    }
}
