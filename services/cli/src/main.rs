//! `afctl`: see the library for the commands. Exit codes: 0 success, 1 the operation or the
//! connection failed, 2 usage or local setup error.

use std::process::ExitCode;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = std::env::args().skip(1).collect();
    let mut out = std::io::stdout();
    match cli::run(args, &mut out).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            match &err {
                // clap's text already ends with a newline.
                cli::CliError::Usage(text) => eprint!("{text}"),
                other => eprintln!("{other}"),
            }
            ExitCode::from(err.exit_code())
        }
    }
}
