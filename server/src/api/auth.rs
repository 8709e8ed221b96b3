//! Bearer-token check on every RPC of the taskd services.

use std::sync::Arc;

use tonic::service::Interceptor;
use tonic::{Request, Status};

/// Refuses requests without `authorization: Bearer <token>` when a token is configured.
#[derive(Clone, Debug)]
pub struct Auth {
    expected: Option<Arc<[u8]>>,
}

impl Auth {
    /// Checks for `token`; `None` lets everything through.
    pub fn new(token: Option<&str>) -> Auth {
        Auth {
            expected: token.map(|t| Arc::from(format!("Bearer {t}").into_bytes())),
        }
    }
}

/// Compares without an early exit, so timing does not reveal the token's prefix.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Interceptor for Auth {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.expected else {
            return Ok(req);
        };
        match req.metadata().get(taskd_proto::AUTHORIZATION_HEADER) {
            Some(v) if same(v.as_bytes(), expected) => Ok(req),
            Some(_) => Err(Status::unauthenticated("invalid bearer token")),
            None => Err(Status::unauthenticated(
                "missing `authorization: Bearer <token>` metadata; this taskd requires a token",
            )),
        }
    }
}
