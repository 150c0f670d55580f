//! Shell completions and man pages generated from the command-line definitions, checked by the
//! shells and `man` themselves (scripts/setup installs zsh and fish).

use std::path::Path;
use std::process::Command;

use testkit::{TestDirectory, binary};

/// Runs a command that must succeed; its standard output.
fn stdout(command: &mut Command) -> String {
    let output = command
        .output()
        .unwrap_or_else(|error| panic!("{command:?} (scripts/setup installs it): {error}"));
    assert!(
        output.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

fn vsrscope(arguments: &[&str]) -> String {
    stdout(Command::new(binary("vsrscope")).args(arguments))
}

fn shell(shell: &str, arguments: &[&str]) -> String {
    stdout(Command::new(shell).args(arguments))
}

/// `vsrscope completions SHELL` written to `directory/name`; its path.
fn script(directory: &Path, shell: &str, name: &str) -> String {
    let path = directory.join(name);
    std::fs::write(&path, vsrscope(&["completions", shell])).unwrap();
    path.to_str().unwrap().to_string()
}

#[test]
fn bash_and_fish_complete_serve_flags_and_zsh_reads_its_script() {
    let directory = TestDirectory::new("completions");
    let bash = script(&directory.0, "bash", "vsrscope.bash");
    // What bash does on `vsrscope serve --web.c<TAB>`.
    let completed = shell(
        "bash",
        &[
            "-c",
            &format!(
                "source {bash}; COMP_WORDS=(vsrscope serve --web.c); COMP_CWORD=2; \
                 _vsrscope vsrscope --web.c serve; printf '%s\\n' \"${{COMPREPLY[@]}}\""
            ),
        ],
    );
    assert_eq!(completed, "--web.config.file\n");

    let fish = script(&directory.0, "fish", "vsrscope.fish");
    let completed = shell(
        "fish",
        &[
            "-c",
            &format!("source {fish}; complete -C 'vsrscope serve --web.'"),
        ],
    );
    let flags: Vec<&str> = completed
        .lines()
        .map(|line| line.split('\t').next().unwrap())
        .collect();
    assert_eq!(
        flags,
        ["--web.config.file", "--web.listen-address"],
        "{completed}"
    );
    let commands = shell(
        "fish",
        &["-c", &format!("source {fish}; complete -C 'vsrscope '")],
    );
    for command in ["list", "serve", "snapshot", "top", "completions", "man"] {
        assert!(
            commands
                .lines()
                .any(|line| line.starts_with(&format!("{command}\t"))),
            "{command} in {commands}"
        );
    }

    let zsh = script(&directory.0, "zsh", "_vsrscope");
    shell("zsh", &["-n", &zsh]);
    assert!(
        std::fs::read_to_string(&zsh)
            .unwrap()
            .contains("--web.config.file")
    );
}

#[test]
fn man_pages_render_every_command_and_flag() {
    let directory = TestDirectory::new("man-pages");
    let pages = directory.0.join("man1");
    vsrscope(&["man", "--out-dir", pages.to_str().unwrap()]);
    let render = |page: &str| {
        let path = pages.join(page);
        assert!(path.exists(), "{} was not written", path.display());
        let page = stdout(
            Command::new("man")
                .arg("-l")
                .arg(&path)
                .env("MANWIDTH", "200"),
        );
        // Off a terminal, man emboldens by overstriking (`X\x08X`): keep the plain text.
        let mut text = String::new();
        for character in page.chars() {
            if character == '\x08' {
                text.pop();
            } else {
                text.push(character);
            }
        }
        text
    };
    let main = render("vsrscope.1");
    for command in ["list", "serve", "snapshot", "top", "completions", "man"] {
        assert!(
            main.contains(&format!("vsrscope-{command}(1)")),
            "{command} in {main}"
        );
        render(&format!("vsrscope-{command}.1"));
    }
    let serve = render("vsrscope-serve.1");
    for flag in [
        "--web.config.file <PATH>",
        "--listen <LISTEN>",
        "--otlp-endpoint <URL>",
        "--on-demand",
    ] {
        assert!(serve.contains(flag), "{flag} in {serve}");
    }
}
