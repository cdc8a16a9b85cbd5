//! The experiments store: experiments, one record per generated image, and feedback, in SQLite
//! (embedded, the default) or PostgreSQL (shared by replicas) through sqlx's `Any` driver with
//! the same SQL. Writes are committed before the request that made them is answered; SQLite
//! runs in WAL mode with `synchronous = FULL`, so an acknowledged record survives the process
//! being killed (and the machine losing power).
//!
//! Migrations are numbered SQL scripts applied in order inside a transaction each, recorded in
//! `tiller_migrations`; written in the subset both databases accept.

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Db(String),
    #[error("`{0}` already exists")]
    Exists(String),
    #[error("`{0}` not found")]
    NotFound(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        StoreError::Db(e.to_string())
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

const MIGRATIONS: &[&str] = &[
    // 1: experiments, records, feedback.
    "CREATE TABLE experiments (
        name TEXT PRIMARY KEY,
        spec TEXT NOT NULL,
        status TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL
    );
    CREATE TABLE records (
        image_id TEXT PRIMARY KEY,
        experiment TEXT NOT NULL,
        arm TEXT NOT NULL,
        user_hash TEXT,
        prompt TEXT NOT NULL,
        seed TEXT NOT NULL,
        metrics TEXT NOT NULL,
        denoiser_evals BIGINT NOT NULL,
        reward_evals BIGINT NOT NULL,
        latency_ms DOUBLE PRECISION NOT NULL,
        created_at BIGINT NOT NULL
    );
    CREATE INDEX records_by_experiment ON records (experiment, created_at);
    CREATE TABLE feedback (
        id TEXT PRIMARY KEY,
        image_id TEXT NOT NULL,
        score DOUBLE PRECISION,
        preferred_over TEXT,
        created_at BIGINT NOT NULL
    );
    CREATE INDEX feedback_by_image ON feedback (image_id);",
];

/// One generated image of an experiment.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub image_id: String,
    pub experiment: String,
    pub arm: String,
    pub user_hash: Option<String>,
    pub prompt: String,
    pub seed: u64,
    /// Metric name → value on the final image.
    pub metrics: std::collections::BTreeMap<String, f64>,
    pub denoiser_evals: i64,
    pub reward_evals: i64,
    pub latency_ms: f64,
    pub created_at: i64,
}

impl Record {
    /// One record per image of a finished job run under `experiment`/`arm`, with fresh ids; the
    /// job's work is shared equally by its images.
    pub fn of_job(
        experiment: &str,
        arm: &str,
        user_hash: Option<&str>,
        prompt: &str,
        out: &crate::engine::JobOutput,
        latency_ms: f64,
    ) -> Vec<Record> {
        let n = out.images.len().max(1) as i64;
        out.images
            .iter()
            .map(|img| Record {
                image_id: new_id(),
                experiment: experiment.to_string(),
                arm: arm.to_string(),
                user_hash: user_hash.map(String::from),
                prompt: prompt.to_string(),
                seed: img.seed,
                metrics: img.metrics.iter().map(|(k, v)| (k.clone(), *v as f64)).collect(),
                denoiser_evals: out.denoiser_evals as i64 / n,
                reward_evals: out.reward_evals as i64 / n,
                latency_ms,
                created_at: now(),
            })
            .collect()
    }
}

/// One piece of feedback: a score, or a preference over another image.
#[derive(Debug, Clone, PartialEq)]
pub struct Feedback {
    pub image_id: String,
    pub score: Option<f64>,
    pub preferred_over: Option<String>,
}

/// A stored experiment: its spec as JSON text and its status.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredExperiment {
    pub name: String,
    pub spec: String,
    pub status: String,
    pub created_at: i64,
}

#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store")
    }
}

impl Store {
    /// Open (and migrate) the database at `url`: `sqlite://PATH?mode=rwc` or `postgres://...`.
    pub async fn open(url: &str) -> StoreResult<Self> {
        sqlx::any::install_default_drivers();
        if let Some(path) = url.strip_prefix("sqlite://") {
            let file = path.split('?').next().unwrap_or(path);
            if let Some(dir) = std::path::Path::new(file).parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(|e| StoreError::Db(format!("{}: {e}", dir.display())))?;
            }
        }
        let sqlite = url.starts_with("sqlite:");
        let pool = AnyPoolOptions::new()
            // One writer at a time is what SQLite allows anyway; readers use WAL snapshots.
            .max_connections(if sqlite { 4 } else { 8 })
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if sqlite {
                        for pragma in
                            ["PRAGMA journal_mode = WAL", "PRAGMA synchronous = FULL", "PRAGMA busy_timeout = 10000"]
                        {
                            sqlx::query(pragma).execute(&mut *conn).await?;
                        }
                    }
                    Ok(())
                })
            })
            .connect(url)
            .await?;
        let store = Self { pool };
        store.migrate().await?;
        Ok(store)
    }

    async fn migrate(&self) -> StoreResult<()> {
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS tiller_migrations (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)",
        )
        .execute(&self.pool)
        .await?;
        let done: i64 =
            sqlx::query("SELECT COUNT(*) FROM tiller_migrations").fetch_one(&self.pool).await?.try_get(0)?;
        for (i, script) in MIGRATIONS.iter().enumerate().skip(done as usize) {
            let mut tx = self.pool.begin().await?;
            for statement in script.split(';').map(str::trim).filter(|s| !s.is_empty()) {
                sqlx::query(statement).execute(&mut *tx).await?;
            }
            sqlx::query("INSERT INTO tiller_migrations (version, applied_at) VALUES ($1, $2)")
                .bind(i as i64 + 1)
                .bind(now())
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
        }
        Ok(())
    }

    pub async fn create_experiment(&self, name: &str, spec: &str) -> StoreResult<()> {
        if self.get_experiment(name).await.is_ok() {
            return Err(StoreError::Exists(name.to_string()));
        }
        let t = now();
        sqlx::query("INSERT INTO experiments (name, spec, status, created_at, updated_at) VALUES ($1, $2, $3, $4, $5)")
            .bind(name)
            .bind(spec)
            .bind("running")
            .bind(t)
            .bind(t)
            .execute(&self.pool)
            .await
            .map_err(|e| match self_exists(&e) {
                true => StoreError::Exists(name.to_string()),
                false => e.into(),
            })?;
        Ok(())
    }

    fn experiment_row(row: &AnyRow) -> StoreResult<StoredExperiment> {
        Ok(StoredExperiment {
            name: row.try_get("name")?,
            spec: row.try_get("spec")?,
            status: row.try_get("status")?,
            created_at: row.try_get("created_at")?,
        })
    }

    pub async fn get_experiment(&self, name: &str) -> StoreResult<StoredExperiment> {
        let row = sqlx::query("SELECT name, spec, status, created_at FROM experiments WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StoreError::NotFound(name.to_string()))?;
        Self::experiment_row(&row)
    }

    pub async fn list_experiments(&self) -> StoreResult<Vec<StoredExperiment>> {
        let rows = sqlx::query("SELECT name, spec, status, created_at FROM experiments ORDER BY created_at, name")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(Self::experiment_row).collect()
    }

    pub async fn update_experiment(&self, name: &str, spec: &str, status: &str) -> StoreResult<()> {
        let done = sqlx::query("UPDATE experiments SET spec = $1, status = $2, updated_at = $3 WHERE name = $4")
            .bind(spec)
            .bind(status)
            .bind(now())
            .bind(name)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(name.to_string()));
        }
        Ok(())
    }

    pub async fn insert_record(&self, r: &Record) -> StoreResult<()> {
        let metrics = serde_json::to_string(&r.metrics).unwrap_or_else(|_| "{}".into());
        sqlx::query(
            "INSERT INTO records (image_id, experiment, arm, user_hash, prompt, seed, metrics, denoiser_evals, \
             reward_evals, latency_ms, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        )
        .bind(&r.image_id)
        .bind(&r.experiment)
        .bind(&r.arm)
        .bind(r.user_hash.clone())
        .bind(&r.prompt)
        .bind(r.seed.to_string())
        .bind(metrics)
        .bind(r.denoiser_evals)
        .bind(r.reward_evals)
        .bind(r.latency_ms)
        .bind(r.created_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The record of an image, if it was generated under an experiment.
    pub async fn record(&self, image_id: &str) -> StoreResult<Record> {
        let row = sqlx::query(&format!("{RECORD_COLUMNS} WHERE image_id = $1"))
            .bind(image_id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StoreError::NotFound(image_id.to_string()))?;
        record_row(&row)
    }

    /// Every record of an experiment, oldest first.
    pub async fn records(&self, experiment: &str) -> StoreResult<Vec<Record>> {
        let rows = sqlx::query(&format!("{RECORD_COLUMNS} WHERE experiment = $1 ORDER BY created_at, image_id"))
            .bind(experiment)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(record_row).collect()
    }

    pub async fn insert_feedback(&self, f: &Feedback) -> StoreResult<String> {
        let id = new_id();
        sqlx::query(
            "INSERT INTO feedback (id, image_id, score, preferred_over, created_at) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&id)
        .bind(&f.image_id)
        .bind(f.score)
        .bind(f.preferred_over.clone())
        .bind(now())
        .execute(&self.pool)
        .await?;
        Ok(id)
    }

    /// Feedback on the images of an experiment.
    pub async fn feedback(&self, experiment: &str) -> StoreResult<Vec<Feedback>> {
        let rows = sqlx::query(
            "SELECT f.image_id, f.score, f.preferred_over FROM feedback f JOIN records r ON r.image_id = f.image_id \
             WHERE r.experiment = $1 ORDER BY f.created_at, f.id",
        )
        .bind(experiment)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(Feedback {
                    image_id: row.try_get("image_id")?,
                    score: row.try_get("score")?,
                    preferred_over: row.try_get("preferred_over")?,
                })
            })
            .collect()
    }
}

const RECORD_COLUMNS: &str = "SELECT image_id, experiment, arm, user_hash, prompt, seed, metrics, denoiser_evals, \
                              reward_evals, latency_ms, created_at FROM records";

fn record_row(row: &AnyRow) -> StoreResult<Record> {
    let metrics: String = row.try_get("metrics")?;
    let seed: String = row.try_get("seed")?;
    Ok(Record {
        image_id: row.try_get("image_id")?,
        experiment: row.try_get("experiment")?,
        arm: row.try_get("arm")?,
        user_hash: row.try_get("user_hash")?,
        prompt: row.try_get("prompt")?,
        seed: seed.parse().map_err(|_| StoreError::Db(format!("malformed seed `{seed}`")))?,
        metrics: serde_json::from_str(&metrics).map_err(|e| StoreError::Db(format!("malformed metrics: {e}")))?,
        denoiser_evals: row.try_get("denoiser_evals")?,
        reward_evals: row.try_get("reward_evals")?,
        latency_ms: row.try_get("latency_ms")?,
        created_at: row.try_get("created_at")?,
    })
}

fn self_exists(e: &sqlx::Error) -> bool {
    e.as_database_error().is_some_and(|d| d.is_unique_violation())
}

/// Milliseconds since the Unix epoch.
pub fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// A random 128-bit id, hex.
pub fn new_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(exp: &str, id: &str, arm: &str, v: f64) -> Record {
        Record {
            image_id: id.into(),
            experiment: exp.into(),
            arm: arm.into(),
            user_hash: Some("u".into()),
            prompt: "p".into(),
            seed: u64::MAX,
            metrics: [("m".to_string(), v)].into_iter().collect(),
            denoiser_evals: 10,
            reward_evals: 2,
            latency_ms: 1.5,
            created_at: now(),
        }
    }

    /// The same round trip on any backend; names are unique so a shared database can be reused.
    async fn round_trip(url: &str) {
        let e = format!("e-{}", new_id());
        let (a, b) = (new_id(), new_id());
        {
            let s = Store::open(url).await.unwrap();
            s.create_experiment(&e, "{}").await.unwrap();
            assert!(matches!(s.create_experiment(&e, "{}").await, Err(StoreError::Exists(_))));
            s.insert_record(&rec(&e, &a, "x", 1.0)).await.unwrap();
            s.insert_record(&rec(&e, &b, "y", 2.0)).await.unwrap();
            let score = Feedback { image_id: a.clone(), score: Some(4.0), preferred_over: None };
            s.insert_feedback(&score).await.unwrap();
            let pref = Feedback { image_id: b.clone(), score: None, preferred_over: Some(a.clone()) };
            s.insert_feedback(&pref).await.unwrap();
            s.update_experiment(&e, "{\"x\": 1}", "paused").await.unwrap();
        }
        let s = Store::open(url).await.unwrap();
        let got = s.get_experiment(&e).await.unwrap();
        assert_eq!((got.spec.as_str(), got.status.as_str()), ("{\"x\": 1}", "paused"));
        let r = s.records(&e).await.unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].seed, u64::MAX);
        assert!(r.iter().any(|r| r.metrics["m"] == 1.0));
        assert_eq!(s.record(&b).await.unwrap().arm, "y");
        assert!(matches!(s.record("zz").await, Err(StoreError::NotFound(_))));
        let f = s.feedback(&e).await.unwrap();
        assert_eq!(f.len(), 2);
        assert!(f.iter().any(|f| f.image_id == b && f.preferred_over.as_deref() == Some(a.as_str())));
        assert!(f.iter().any(|f| f.image_id == a && f.score == Some(4.0)));
        assert!(matches!(s.update_experiment("nope", "{}", "running").await, Err(StoreError::NotFound(_))));
    }

    #[tokio::test]
    async fn sqlite_round_trips_and_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        round_trip(&format!("sqlite://{}?mode=rwc", dir.path().join("sub/t.db").display())).await;
    }

    /// Against a real PostgreSQL server when `TILLER_TEST_POSTGRES_URL` names one (CI starts one
    /// with scripts/postgres.sh); skipped otherwise.
    #[tokio::test]
    async fn postgres_round_trips() {
        match std::env::var("TILLER_TEST_POSTGRES_URL") {
            Ok(url) if !url.is_empty() => round_trip(&url).await,
            _ => eprintln!("TILLER_TEST_POSTGRES_URL is not set: PostgreSQL not tested"),
        }
    }
}
