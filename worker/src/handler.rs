//! Handlers: the type-erased functions the worker calls by task name.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::context::TaskContext;
use crate::error::{KIND_BAD_PAYLOAD, KIND_INTERNAL, TaskError};

/// A handler's successful result: bytes and their media type.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Output {
    /// The result bytes.
    pub bytes: Vec<u8>,
    /// Their media type; empty means the broker's default (`application/json`).
    pub content_type: String,
}

impl Output {
    /// Output `bytes` of media type `content_type`.
    pub fn new(bytes: Vec<u8>, content_type: impl Into<String>) -> Self {
        Output {
            bytes,
            content_type: content_type.into(),
        }
    }
}

/// Values a handler may return on success.
pub trait IntoOutput {
    /// Converts into an [`Output`].
    fn into_output(self) -> Output;
}

impl IntoOutput for Output {
    fn into_output(self) -> Output {
        self
    }
}

impl IntoOutput for Vec<u8> {
    /// Raw bytes with the default content type.
    fn into_output(self) -> Output {
        Output {
            bytes: self,
            content_type: String::new(),
        }
    }
}

impl IntoOutput for String {
    /// UTF-8 bytes with the default content type.
    fn into_output(self) -> Output {
        self.into_bytes().into_output()
    }
}

impl IntoOutput for () {
    /// Empty output.
    fn into_output(self) -> Output {
        Output::default()
    }
}

/// The future an async handler returns, boxed once per attempt (type erasure).
pub(crate) type HandlerFuture = Pin<Box<dyn Future<Output = Result<Output, TaskError>> + Send>>;

type AsyncFn = dyn Fn(TaskContext, Vec<u8>) -> HandlerFuture + Send + Sync;
type BlockingFn = dyn Fn(TaskContext, Vec<u8>) -> Result<Output, TaskError> + Send + Sync;

/// A registered handler.
#[derive(Clone)]
pub(crate) enum Handler {
    /// Polled on the async runtime.
    Async(Arc<AsyncFn>),
    /// Run on tokio's blocking pool.
    Blocking(Arc<BlockingFn>),
}

impl std::fmt::Debug for Handler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Handler::Async(_) => f.write_str("Handler::Async"),
            Handler::Blocking(_) => f.write_str("Handler::Blocking"),
        }
    }
}

impl Handler {
    pub(crate) fn from_async<F, Fut, O>(f: F) -> Self
    where
        F: Fn(TaskContext, Vec<u8>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<O, TaskError>> + Send + 'static,
        O: IntoOutput,
    {
        Handler::Async(Arc::new(move |ctx, payload| {
            let fut = f(ctx, payload);
            Box::pin(async move { fut.await.map(IntoOutput::into_output) })
        }))
    }

    pub(crate) fn from_blocking<F, O>(f: F) -> Self
    where
        F: Fn(TaskContext, Vec<u8>) -> Result<O, TaskError> + Send + Sync + 'static,
        O: IntoOutput,
    {
        Handler::Blocking(Arc::new(move |ctx, payload| {
            f(ctx, payload).map(IntoOutput::into_output)
        }))
    }

    pub(crate) fn from_typed<I, O, F, Fut>(f: F) -> Self
    where
        I: DeserializeOwned + Send + 'static,
        O: Serialize + 'static,
        F: Fn(TaskContext, I) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<O, TaskError>> + Send + 'static,
    {
        let f = Arc::new(f);
        Handler::Async(Arc::new(move |ctx, payload| {
            let f = Arc::clone(&f);
            Box::pin(async move {
                let input: I = serde_json::from_slice(&payload).map_err(|e| {
                    TaskError::fatal(format!("payload is not the expected JSON: {e}"))
                        .with_kind(KIND_BAD_PAYLOAD)
                })?;
                let output = f(ctx, input).await?;
                let bytes = serde_json::to_vec(&output).map_err(|e| {
                    TaskError::fatal(format!("cannot encode the output as JSON: {e}"))
                        .with_kind(KIND_INTERNAL)
                })?;
                Ok(Output::new(bytes, taskd_proto::DEFAULT_CONTENT_TYPE))
            })
        }))
    }
}
