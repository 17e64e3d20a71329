//! A real browser (Debian's chromium, headless, driven by chromedriver over WebDriver)
//! against the running web chat: start a thread, watch its card reach succeeded with a
//! branch link, follow up, cancel a long run. Screenshots land in
//! `target/test-artifacts/`.

use std::net::TcpListener as StdListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::{ClientBuilder, Locator};
use threadline::bots::web::{WebState, serve};
use threadline::config::{ForgeConfig, Secret};
use threadline::orchestrator::forge::ForgeKind;

use crate::fake_forge::FakeForge;
use crate::harness::TestEnv;

struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

async fn start_chromedriver() -> (Driver, u16) {
    let port = free_port();
    let child = Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the browser test needs chromedriver: apt-get install chromium chromium-driver");
    let driver = Driver(child);
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return (driver, port);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("chromedriver did not start");
}

/// Types `text` into the `start` or `reply` form and presses its Send button.
async fn send(browser: &fantoccini::Client, form: &str, text: &str) {
    let field = browser.find(Locator::Id(&format!("{form}-prompt"))).await.unwrap();
    field.send_keys(text).await.unwrap();
    let button = browser
        .find(Locator::Css(&format!("#{form} button[type=submit]")))
        .await
        .unwrap();
    button.click().await.unwrap();
}

/// Clicks what `css` names, finding it again when the page redrew it in between (a
/// card is drawn anew on every update of its run, which leaves a found element stale).
async fn click(browser: &fantoccini::Client, css: &str) {
    let mut last = String::new();
    for _ in 0..50 {
        match browser.find(Locator::Css(css)).await {
            Ok(element) => match element.click().await {
                Ok(()) => return,
                Err(e) => last = e.to_string(),
            },
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("cannot click {css}: {last}");
}

/// Reads what `css` names with `f`, finding it again when the page redrew it in between.
async fn read<T, F, Fut>(browser: &fantoccini::Client, css: &str, f: F) -> T
where
    F: Fn(fantoccini::elements::Element) -> Fut,
    Fut: std::future::Future<Output = Result<T, fantoccini::error::CmdError>>,
{
    let mut last = String::new();
    for _ in 0..50 {
        match browser.find(Locator::Css(css)).await {
            Ok(element) => match f(element).await {
                Ok(value) => return value,
                Err(e) => last = e.to_string(),
            },
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("cannot read {css}: {last}");
}

fn artifacts() -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_drives_a_thread_from_prompt_to_branch_and_cancels_a_run() {
    let mut env = TestEnv::new();
    env.add_demo_repo();
    // The demo origin is also a project on a fake GitHub, so Open PR works from the page.
    let root = env.dir.path().parent().unwrap();
    let project = format!("{}/origin", env.dir.path().file_name().unwrap().to_str().unwrap());
    let forge = FakeForge::start(root).await;
    env.config.repos.get_mut("demo").unwrap().forge = ForgeConfig {
        kind: Some(ForgeKind::Github),
        api_url: forge.api_url("github"),
        web_url: format!("http://{}/{project}", forge.addr),
        project: project.clone(),
        token: Secret::new(crate::fake_forge::TOKEN),
        ..Default::default()
    };
    let orch = env.orchestrator().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let stopped = stop.clone();
    let server = tokio::spawn(serve(listener, WebState::new(orch.clone(), addr), async move {
        stopped.cancelled().await
    }));

    let (_driver, port) = start_chromedriver().await;
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": "/usr/bin/chromium",
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,900"]
        }),
    );
    let browser = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{port}"))
        .await
        .expect("chromium starts under chromedriver");
    let wait = |secs| {
        browser
            .wait()
            .at_most(Duration::from_secs(secs))
            .every(Duration::from_millis(100))
    };

    // A new thread with a prompt.
    browser.goto(&format!("http://{addr}/")).await.unwrap();
    wait(20)
        .for_element(Locator::Css("#repo option[value=demo]"))
        .await
        .unwrap();
    send(&browser, "start", "echo from-browser > b.txt\necho browser-log-line").await;

    // Its card reaches succeeded, with the branch link and the log line.
    let card = wait(90)
        .for_element(Locator::Css(".card[data-state=succeeded]"))
        .await
        .unwrap();
    let link = card.find(Locator::Css("a.branch-link")).await.unwrap();
    let href = link.attr("href").await.unwrap().unwrap();
    assert!(
        href.starts_with("https://forge.example/demo/tree/threadline/echo-from-browser"),
        "{href}"
    );
    let text = card.text().await.unwrap();
    assert!(
        text.contains("browser-log-line") && text.contains("1 file changed"),
        "{text}"
    );
    let thread = browser.find(Locator::Css("#threads li.active")).await.unwrap();
    let pipeline_id = thread.attr("data-pipeline").await.unwrap().unwrap();
    std::fs::write(artifacts().join("chat.png"), browser.screenshot().await.unwrap()).unwrap();

    // Open PR from the card: the button becomes a link to the pull request.
    click(&browser, "#messages li:nth-child(1) .card button[data-action=open_pr]").await;
    let pr_css = "#messages li:nth-child(1) .card a.pr-link";
    wait(30).for_element(Locator::Css(pr_css)).await.unwrap();
    let pr_url = format!("http://{}/{project}/pull/1", forge.addr);
    let (href, label) = read(&browser, pr_css, |e| async move {
        Ok((e.attr("href").await?, e.text().await?))
    })
    .await;
    assert_eq!(href.as_deref(), Some(pr_url.as_str()));
    assert_eq!(label, "View PR #1");
    assert_eq!(forge.prs().len(), 1);

    // A follow-up in the same thread, with a file attached from the form; its card says
    // the pull request has it.
    let attached = tempfile::tempdir().unwrap();
    let file = attached.path().join("notes.txt");
    std::fs::write(&file, "picked in the browser\n").unwrap();
    let picker = browser.find(Locator::Id("reply-files")).await.unwrap();
    picker.send_keys(&file.display().to_string()).await.unwrap();
    send(
        &browser,
        "reply",
        "echo more >> b.txt && cp /threadline/attachments/notes.txt notes.txt",
    )
    .await;
    let second = "#messages li:nth-child(2) .card[data-state=succeeded]";
    wait(90).for_element(Locator::Css(second)).await.unwrap();
    let note = read(&browser, &format!("{second} .note"), |e| async move { e.text().await }).await;
    assert_eq!(note, "Pushed to pull request #1: it now shows this run's changes.");

    // A long run, cancelled from its card.
    send(&browser, "reply", "sleep 60").await;
    let cancel = "#messages li:nth-child(3) .card[data-state=running] button[data-action=cancel]";
    wait(60).for_element(Locator::Css(cancel)).await.unwrap();
    click(&browser, cancel).await;
    wait(60)
        .for_element(Locator::Css("#messages li:nth-child(3) .card[data-state=cancelled]"))
        .await
        .unwrap();
    std::fs::write(
        artifacts().join("chat-cancelled.png"),
        browser.screenshot().await.unwrap(),
    )
    .unwrap();

    // The dashboard lists the pipeline, and its run page shows the state history.
    browser.goto(&format!("http://{addr}/dashboard")).await.unwrap();
    let row = wait(20)
        .for_element(Locator::Css(&format!("#pipelines tr[data-pipeline='{pipeline_id}']")))
        .await
        .unwrap();
    assert!(row.text().await.unwrap().contains("web chat"));
    // The chart of runs per day by outcome draws a bar for today's runs.
    let chart = browser.find(Locator::Css("#stats")).await.unwrap();
    assert!(!chart.find_all(Locator::Css("svg rect")).await.unwrap().is_empty());
    assert!(
        chart.text().await.unwrap().contains("runs ended"),
        "{}",
        chart.text().await.unwrap()
    );
    std::fs::write(artifacts().join("dashboard.png"), browser.screenshot().await.unwrap()).unwrap();
    // The pipeline's page: its pull request and who opened it.
    browser
        .goto(&format!("http://{addr}/pipelines/{pipeline_id}"))
        .await
        .unwrap();
    let approvals = wait(20).for_element(Locator::Css("#approvals")).await.unwrap();
    let approvals = approvals.text().await.unwrap();
    assert!(
        approvals.contains("web") && approvals.contains("approved"),
        "{approvals}"
    );
    let pr = browser.find(Locator::Css("#pull-request a")).await.unwrap();
    assert_eq!(pr.attr("href").await.unwrap().as_deref(), Some(pr_url.as_str()));
    std::fs::write(artifacts().join("pipeline.png"), browser.screenshot().await.unwrap()).unwrap();
    browser
        .goto(&format!("http://{addr}/runs/{pipeline_id}-1"))
        .await
        .unwrap();
    wait(20).for_element(Locator::Css("pre.log.full")).await.unwrap();
    let page = browser.find(Locator::Css("main")).await.unwrap().text().await.unwrap();
    assert!(
        page.contains("State history") && page.contains("browser-log-line"),
        "{page}"
    );
    std::fs::write(artifacts().join("run.png"), browser.screenshot().await.unwrap()).unwrap();
    browser.close().await.unwrap();

    let pipeline = orch.store().pipeline(&pipeline_id).await.unwrap().unwrap();
    assert_eq!(
        env.origin_file(&pipeline.branch, "b.txt").as_deref(),
        Some("from-browser\nmore\n")
    );
    assert_eq!(
        env.origin_file(&pipeline.branch, "notes.txt").as_deref(),
        Some("picked in the browser\n"),
        "the file attached in the form reached the agent"
    );
    stop.cancel();
    server.await.unwrap().unwrap();
    orch.shutdown().await;
}
