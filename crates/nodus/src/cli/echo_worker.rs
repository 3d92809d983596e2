//! `nodus echo-worker`: a built-in example worker (events `echo`, `upper`, `fail`), so an app can
//! be deployed with nothing but this binary.

use nodus_engine::worker_sdk::{HandlerResult, Request, Response, Worker, WorkerArgs};

/// `nodus echo-worker` arguments.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// `--app NAME --locator HOST:PORT --endpoint SOCKET --uuid UUID`, as the engine passes them.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
}

async fn echo(mut req: Request, mut resp: Response) -> HandlerResult {
    while let Some(chunk) = req.recv().await? {
        resp.write(chunk).await?;
    }
    Ok(())
}

async fn upper(mut req: Request, mut resp: Response) -> HandlerResult {
    while let Some(chunk) = req.recv().await? {
        resp.write(chunk.to_ascii_uppercase()).await?;
    }
    Ok(())
}

async fn fail(_req: Request, _resp: Response) -> HandlerResult {
    Err("failed on purpose".into())
}

/// Serves the engine until it says terminate.
///
/// Fails when the arguments are not the engine's or the engine connection fails.
pub async fn run(a: Args) -> anyhow::Result<u8> {
    let args = WorkerArgs::parse(a.args).map_err(|e| anyhow::anyhow!("{e}"))?;
    Worker::new(args)
        .on("echo", echo)
        .on("upper", upper)
        .on("fail", fail)
        .run()
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(0)
}
