-- A version-1 results.db written by sweep 0.1.0 (commit 3a87cf7, before the schema moved to sweep/store/schema.py):
-- a 3-layer tiny GPT-2 swept exhaustively (8 results, a run, the measurement log), a calibration pass, a greedy
-- step, a strategy choice, a task result and a heal. Dumped with sqlite3's iterdump; tests load it into a file.
BEGIN TRANSACTION;
CREATE TABLE greedy_steps (
    model_id INTEGER REFERENCES models(id), weights TEXT, calib_fingerprint TEXT,
    step INTEGER, layer INTEGER, removed TEXT, calib_ppl REAL, computed_at TEXT,
    PRIMARY KEY (model_id, weights, calib_fingerprint, step));
INSERT INTO "greedy_steps" VALUES(1,'local:abc','f00d',1,2,'2',123.5,'2026-11-26T14:33:18+00:00');
CREATE TABLE "heals" (
   "id" TEXT PRIMARY KEY,
   "model_id" INTEGER REFERENCES "models"("id"),
   "setup_id" TEXT,
   "removed" TEXT,
   "n_removed" INTEGER,
   "n_layers" INTEGER,
   "method" TEXT,
   "lora_r" INTEGER,
   "lora_alpha" INTEGER,
   "lora_dropout" REAL,
   "lora_targets" TEXT,
   "steps" INTEGER,
   "lr" REAL,
   "batch_size" INTEGER,
   "seq" INTEGER,
   "data" TEXT,
   "data_fingerprint" TEXT,
   "eval_data" TEXT,
   "seed" INTEGER,
   "trainable_params" INTEGER,
   "heal_loss_before" REAL,
   "heal_loss_after" REAL,
   "eval_loss_before" REAL,
   "eval_loss_after" REAL,
   "ppl_unhealed" REAL,
   "nll_sum" REAL,
   "n_tokens" INTEGER,
   "ppl" REAL,
   "bpb" REAL,
   "status" TEXT,
   "error" TEXT,
   "train_seconds" REAL,
   "export_dir" TEXT,
   "settings" TEXT,
   "device" TEXT,
   "host" TEXT,
   "measured_at" TEXT
);
INSERT INTO "heals" VALUES('h1',1,'c51b829756fd','2',1,2,'lora',4,NULL,NULL,NULL,3,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,99.0,NULL,'ok',NULL,NULL,NULL,NULL,NULL,NULL,'2026-11-26T14:33:18+00:00');
CREATE TABLE layer_similarity (
    model_id INTEGER REFERENCES models(id), weights TEXT, calib_fingerprint TEXT, calib TEXT,
    metric TEXT,        -- angular-last | angular-all | block-influence
    start INTEGER,      -- layer l
    size INTEGER,       -- block size n (1 for block-influence)
    value REAL, n_sequences INTEGER, n_tokens INTEGER, computed_at TEXT,
    PRIMARY KEY (model_id, weights, calib_fingerprint, metric, start, size));
INSERT INTO "layer_similarity" VALUES(1,'local:abc','f00d','wikitext:validation','angular-last',0,1,0.25,2,128,'2026-11-26T14:33:18+00:00');
INSERT INTO "layer_similarity" VALUES(1,'local:abc','f00d','wikitext:validation','block-influence',0,1,0.5,2,128,'2026-11-26T14:33:18+00:00');
CREATE TABLE measurements (id INTEGER PRIMARY KEY, setup_id TEXT, removed TEXT, status TEXT, run_id INTEGER, pid INTEGER, host TEXT, measured_at TEXT);
INSERT INTO "measurements" VALUES(1,'c51b829756fd','0,1,2','ok',1,4218,'vm','2026-11-26T14:33:05+00:00');
INSERT INTO "measurements" VALUES(2,'c51b829756fd','1,2','ok',1,4218,'vm','2026-11-26T14:33:05+00:00');
INSERT INTO "measurements" VALUES(3,'c51b829756fd','2','ok',1,4218,'vm','2026-11-26T14:33:05+00:00');
INSERT INTO "measurements" VALUES(4,'c51b829756fd','','ok',1,4218,'vm','2026-11-26T14:33:05+00:00');
INSERT INTO "measurements" VALUES(5,'c51b829756fd','1','ok',1,4218,'vm','2026-11-26T14:33:05+00:00');
INSERT INTO "measurements" VALUES(6,'c51b829756fd','0,2','ok',1,4218,'vm','2026-11-26T14:33:05+00:00');
INSERT INTO "measurements" VALUES(7,'c51b829756fd','0','ok',1,4218,'vm','2026-11-26T14:33:05+00:00');
INSERT INTO "measurements" VALUES(8,'c51b829756fd','0,1','ok',1,4218,'vm','2026-11-26T14:33:05+00:00');
CREATE TABLE "meta" (
   "key" TEXT PRIMARY KEY,
   "value" TEXT
);
INSERT INTO "meta" VALUES('schema_version','1');
CREATE TABLE "models" (
   "id" INTEGER PRIMARY KEY,
   "name" TEXT,
   "revision" TEXT,
   "dtype" TEXT,
   "n_layers" INTEGER,
   "model_class" TEXT
);
INSERT INTO "models" VALUES(1,'/tmp/v1/tiny-gpt2','','float32',3,'GPT2LMHeadModel');
CREATE TABLE "results" (
   "setup_id" TEXT REFERENCES "setups"("id"),
   "removed" TEXT,
   "n_removed" INTEGER,
   "n_layers" INTEGER,
   "kept_layers" TEXT,
   "params" INTEGER,
   "params_non_embedding" INTEGER,
   "nll_sum" REAL,
   "n_tokens" INTEGER,
   "n_bytes" INTEGER,
   "ppl" REAL,
   "bpb" REAL,
   "prefill_ms" REAL,
   "prefill_iqr_ms" REAL,
   "prefill_repeats" INTEGER,
   "decode_ms_per_token" REAL,
   "decode_iqr_ms" REAL,
   "latency_signature" TEXT,
   "latency_from" TEXT,
   "status" TEXT,
   "error" TEXT,
   "eval_seconds" REAL,
   "latency_seconds" REAL,
   "device" TEXT,
   "host" TEXT,
   "measured_at" TEXT,
   PRIMARY KEY ("setup_id", "removed")
);
INSERT INTO "results" VALUES('c51b829756fd','0,1,2',3,0,'',1612384,64,3.40617881011962890633e+03,315,1442,4.96754469007544394122e+04,3.46144770906315635272e+00,1.55759005000106753868e+01,6.44313499999782379745e+00,20,9.15478450001217,7.11559049999976878098e+00,'0','0,1,2','ok',NULL,2.03496229125001093507e-01,NULL,'cpu','vm','2026-11-26T14:33:05+00:00');
INSERT INTO "results" VALUES('c51b829756fd','1,2',2,1,'0',1625088,12768,3.40652675056457519527e+03,315,1442,4.97303473654696863394e+04,3.46180129521443857854e+00,4.12832115000014709949e+01,1.75766442499707409297e+01,20,1.89751120000067885484e+01,7.29790662499141262742e+00,'1x6616e185','0,1','ok',NULL,2.03496229125001093507e-01,NULL,'cpu','vm','2026-11-26T14:33:05+00:00');
INSERT INTO "results" VALUES('c51b829756fd','2',1,2,'0,1',1637792,25472,3.40688291931152343748e+03,315,1442,4.97866089938353106837e+04,3.4621632431807345398e+00,6.62237005000179124181e+01,1.90311205000028849099e+01,20,2.95352795000098922173e+01,1.00164987499979929452e+01,'2x6616e185','0','ok',NULL,2.03496229125001093507e-01,NULL,'cpu','vm','2026-11-26T14:33:05+00:00');
INSERT INTO "results" VALUES('c51b829756fd','',0,3,'0,1,2',1650496,38176,3.40663182163238525382e+03,315,1442,4.97469381345386646008e+04,3.46190807117284693461e+00,9.1331830499967736614e+01,2.66161494999579417708e+01,20,3.75993447499922694987e+01,1.3246273999996560633e+01,'3x6616e185','','ok',NULL,2.03496229125001093507e-01,NULL,'cpu','vm','2026-11-26T14:33:05+00:00');
INSERT INTO "results" VALUES('c51b829756fd','1',1,2,'0,2',1637792,25472,3.40629495239257812496e+03,315,1442,49693.7658945711,3.46156573586886340265e+00,6.62237005000179124181e+01,1.90311205000028849099e+01,20,2.95352795000098922173e+01,1.00164987499979929452e+01,'2x6616e185','0','ok',NULL,2.03496229125001093507e-01,NULL,'cpu','vm','2026-11-26T14:33:05+00:00');
INSERT INTO "results" VALUES('c51b829756fd','0,2',2,1,'1',1625088,12768,3.40651982402801513675e+03,315,1442,4.9729253856637784339e+04,3.46179425628740444764e+00,4.12832115000014709949e+01,1.75766442499707409297e+01,20,1.89751120000067885484e+01,7.29790662499141262742e+00,'1x6616e185','0,1','ok',NULL,2.03496229125001093507e-01,NULL,'cpu','vm','2026-11-26T14:33:05+00:00');
INSERT INTO "results" VALUES('c51b829756fd','0',1,2,'1,2',1637792,25472,3.40624020004272460931e+03,315,1442,4.96851290247155193352e+04,3.46151009510349760844e+00,6.62237005000179124181e+01,1.90311205000028849099e+01,20,2.95352795000098922173e+01,1.00164987499979929452e+01,'2x6616e185','0','ok',NULL,2.03496229125001093507e-01,NULL,'cpu','vm','2026-11-26T14:33:05+00:00');
INSERT INTO "results" VALUES('c51b829756fd','0,1',2,1,'2',1625088,12768,3405.91081905365,315,1442,4.96332027273107887583e+04,3.46117536955513438456e+00,4.12832115000014709949e+01,1.75766442499707409297e+01,20,1.89751120000067885484e+01,7.29790662499141262742e+00,'1x6616e185','0,1','ok',NULL,2.03496229125001093507e-01,NULL,'cpu','vm','2026-11-26T14:33:05+00:00');
CREATE TABLE "runs" (
   "id" INTEGER PRIMARY KEY,
   "setup_id" TEXT,
   "status" TEXT,
   "pid" INTEGER,
   "host" TEXT,
   "command" TEXT,
   "planned" INTEGER,
   "to_measure" INTEGER,
   "measured" INTEGER,
   "started_at" TEXT,
   "heartbeat_at" TEXT,
   "ended_at" TEXT
);
INSERT INTO "runs" VALUES(1,'c51b829756fd','done',4218,'vm','/tmp/v1/make_v1.py',8,8,8,'2026-11-26T14:33:02+00:00','2026-11-26T14:33:18+00:00','2026-11-26T14:33:18+00:00');
CREATE TABLE "setups" (
   "id" TEXT PRIMARY KEY,
   "model_id" INTEGER REFERENCES "models"("id"),
   "data" TEXT,
   "data_fingerprint" TEXT,
   "data_tokens" INTEGER,
   "max_length" INTEGER,
   "stride" INTEGER,
   "max_tokens" INTEGER,
   "latency_seq" INTEGER,
   "latency_settings" TEXT,
   "weights" TEXT,
   "device" TEXT,
   "engine_version" TEXT,
   "created_at" TEXT
);
INSERT INTO "setups" VALUES('c51b829756fd',1,'/work/shared/data/wikitext-2-raw-v1/test.parquet','2e0f196c8b3a72a4',287644,64,64,320,8,'shared:seq=8:decode=2:repeats=20:warmup=1:seed=0','local:6e6e9302377e','cpu','1','2026-11-26T14:33:02+00:00');
CREATE TABLE strategy_choices (
    model_id INTEGER REFERENCES models(id), weights TEXT, calib_fingerprint TEXT,
    strategy TEXT, signal TEXT, n INTEGER, removed TEXT, score REAL, chosen_at TEXT,
    PRIMARY KEY (model_id, weights, calib_fingerprint, strategy, signal, n));
INSERT INTO "strategy_choices" VALUES(1,'local:abc','f00d','greedy','calib-ppl',1,'2',123.5,'2026-11-26T14:33:18+00:00');
CREATE TABLE "task_results" (
   "setup_id" TEXT REFERENCES "task_setups"("id"),
   "removed" TEXT,
   "heal_id" TEXT,
   "n_removed" INTEGER,
   "n_layers" INTEGER,
   "metric" TEXT,
   "value" REAL,
   "stderr" REAL,
   "metrics" TEXT,
   "n_samples" INTEGER,
   "status" TEXT,
   "error" TEXT,
   "eval_seconds" REAL,
   "device" TEXT,
   "host" TEXT,
   "measured_at" TEXT,
   PRIMARY KEY ("setup_id", "removed", "heal_id")
);
INSERT INTO "task_results" VALUES('01d4e5ecb2d2','2','',1,2,'acc',0.6,0.1,'{}',10,'ok',NULL,NULL,NULL,NULL,'2026-11-26T14:33:18+00:00');
CREATE TABLE "task_setups" (
   "id" TEXT PRIMARY KEY,
   "model_id" INTEGER REFERENCES "models"("id"),
   "task" TEXT,
   "task_version" TEXT,
   "num_fewshot" INTEGER,
   "task_limit" INTEGER,
   "lm_eval_version" TEXT,
   "weights" TEXT,
   "dtype" TEXT,
   "device" TEXT,
   "engine_version" TEXT,
   "created_at" TEXT
);
INSERT INTO "task_setups" VALUES('01d4e5ecb2d2',1,'boolq','1:ab',0,10,'0.4.9','local:abc','float32','cpu','1','2026-11-26T14:33:18+00:00');
CREATE UNIQUE INDEX "idx_models_name_revision_dtype"
    ON "models" ("name", "revision", "dtype");
CREATE VIEW results_vs_baseline AS
SELECT
    m.name AS model,
    r.setup_id AS setup,
    r.removed,
    r.n_removed,
    r.n_layers,
    r.ppl,
    r.prefill_ms AS speed_ms,
    r.params,
    100.0 * (r.ppl / b.ppl - 1.0) AS ppl_change_pct,
    100.0 * (r.prefill_ms / b.prefill_ms - 1.0) AS speed_change_pct,
    r.status,
    r.error,
    r.bpb,
    r.decode_ms_per_token,
    100.0 * (r.decode_ms_per_token / b.decode_ms_per_token - 1.0) AS decode_change_pct,
    r.params_non_embedding,
    100.0 * (1.0 * r.params / b.params - 1.0) AS params_change_pct,
    r.nll_sum,
    r.n_tokens,
    r.prefill_iqr_ms AS speed_iqr_ms,
    r.prefill_repeats,
    r.latency_from,
    m.revision,
    m.dtype,
    m.n_layers AS model_layers,
    s.data,
    s.max_length,
    s.stride,
    s.max_tokens,
    r.device,
    r.measured_at
FROM results r
JOIN setups s ON s.id = r.setup_id
JOIN models m ON m.id = s.model_id
LEFT JOIN results b ON b.setup_id = r.setup_id AND b.removed = '' AND b.status = 'ok';
CREATE INDEX measurements_variant ON measurements (setup_id, removed);
COMMIT;
