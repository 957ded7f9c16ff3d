-- A version-4 results.db written by sweep at commit 60f7e1d (the release before the search): a 3-layer
-- tiny GPT-2 (byte tokenizer) swept with `sweep run --strategy single,greedy --n 1-2 --latency off` (5
-- results with their per-window losses and intervals, the greedy path, the strategy choices, a run).
-- Dumped with sqlite3's iterdump, plus the file's application_id; tests load it into a file.
PRAGMA application_id = 1398228304;
BEGIN TRANSACTION;
CREATE TABLE "greedy_steps" ("model_id" INTEGER, "weights" TEXT, "calib_fingerprint" TEXT, "step" INTEGER, "layer" INTEGER, "removed" TEXT, "calib_ppl" REAL, "computed_at" TEXT, PRIMARY KEY ("model_id", "weights", "calib_fingerprint", "step"), FOREIGN KEY ("model_id") REFERENCES "models"("id"));
INSERT INTO "greedy_steps" VALUES(1,'local:740d762aa1b9','8f20924e9b428f85',1,1,'1',2.53115050072273305658e+02,'2026-12-03T16:26:58+00:00');
INSERT INTO "greedy_steps" VALUES(1,'local:740d762aa1b9','8f20924e9b428f85',2,0,'0,1',2.52668324566347081362e+02,'2026-12-03T16:26:58+00:00');
CREATE TABLE "heals" ("id" TEXT, "model_id" INTEGER, "setup_id" TEXT, "removed" TEXT, "n_removed" INTEGER, "n_layers" INTEGER, "method" TEXT, "lora_r" INTEGER, "lora_alpha" INTEGER, "lora_dropout" REAL, "lora_targets" TEXT, "steps" INTEGER, "lr" REAL, "batch_size" INTEGER, "seq" INTEGER, "data" TEXT, "data_fingerprint" TEXT, "eval_data" TEXT, "seed" INTEGER, "trainable_params" INTEGER, "heal_loss_before" REAL, "heal_loss_after" REAL, "eval_loss_before" REAL, "eval_loss_after" REAL, "ppl_unhealed" REAL, "nll_sum" REAL, "n_tokens" INTEGER, "ppl" REAL, "bpb" REAL, "status" TEXT, "error" TEXT, "train_seconds" REAL, "export_dir" TEXT, "settings" TEXT, "device" TEXT, "host" TEXT, "measured_at" TEXT, PRIMARY KEY ("id"), FOREIGN KEY ("model_id") REFERENCES "models"("id"));
CREATE TABLE "layer_similarity" ("model_id" INTEGER, "weights" TEXT, "calib_fingerprint" TEXT, "calib" TEXT, "metric" TEXT, "start" INTEGER, "size" INTEGER, "value" REAL, "n_sequences" INTEGER, "n_tokens" INTEGER, "computed_at" TEXT, PRIMARY KEY ("model_id", "weights", "calib_fingerprint", "metric", "start", "size"), FOREIGN KEY ("model_id") REFERENCES "models"("id"));
CREATE TABLE "measurements" ("id" INTEGER PRIMARY KEY, "setup_id" TEXT, "removed" TEXT, "status" TEXT, "run_id" INTEGER, "pid" INTEGER, "host" TEXT, "measured_at" TEXT);
INSERT INTO "measurements" VALUES(1,'4eeaa4f3c243','2','ok',1,7784,'vm','2026-12-03T16:26:58+00:00');
INSERT INTO "measurements" VALUES(2,'4eeaa4f3c243','','ok',1,7784,'vm','2026-12-03T16:26:58+00:00');
INSERT INTO "measurements" VALUES(3,'4eeaa4f3c243','1','ok',1,7784,'vm','2026-12-03T16:26:58+00:00');
INSERT INTO "measurements" VALUES(4,'4eeaa4f3c243','0','ok',1,7784,'vm','2026-12-03T16:26:58+00:00');
INSERT INTO "measurements" VALUES(5,'4eeaa4f3c243','0,1','ok',1,7784,'vm','2026-12-03T16:26:58+00:00');
CREATE TABLE "meta" ("key" TEXT, "value" TEXT, PRIMARY KEY ("key"));
INSERT INTO "meta" VALUES('schema_version','4');
CREATE TABLE "models" ("id" INTEGER PRIMARY KEY, "name" TEXT, "revision" TEXT, "dtype" TEXT, "n_layers" INTEGER, "model_class" TEXT);
INSERT INTO "models" VALUES(1,'tiny-gpt2','','float32',3,'GPT2LMHeadModel');
CREATE TABLE "ppl_intervals" ("setup_id" TEXT, "removed" TEXT, "change_pct" REAL, "low_pct" REAL, "high_pct" REAL, "level" REAL, "resamples" INTEGER, "seed" INTEGER, "measured_at" TEXT, "baseline_at" TEXT, PRIMARY KEY ("setup_id", "removed"), FOREIGN KEY ("setup_id") REFERENCES "setups"("id"));
INSERT INTO "ppl_intervals" VALUES('4eeaa4f3c243','',0.0,0.0,0.0,0.95,2000,0,'2026-12-03T16:26:58+00:00','2026-12-03T16:26:58+00:00');
INSERT INTO "ppl_intervals" VALUES('4eeaa4f3c243','0',-5.47797326378037588434e-02,-2.4238281987802068329e-01,1.11137082078827914566e-01,0.95,2000,0,'2026-12-03T16:26:58+00:00','2026-12-03T16:26:58+00:00');
INSERT INTO "ppl_intervals" VALUES('4eeaa4f3c243','0,1',-5.25098571319955853553e-01,-9.56703289197004758115e-01,-4.56736425394546619038e-02,0.95,2000,0,'2026-12-03T16:26:58+00:00','2026-12-03T16:26:58+00:00');
INSERT INTO "ppl_intervals" VALUES('4eeaa4f3c243','1',-3.41120288521689296601e-01,-6.4065740581827168576e-01,-3.2219002260403729887e-02,0.95,2000,0,'2026-12-03T16:26:58+00:00','2026-12-03T16:26:58+00:00');
INSERT INTO "ppl_intervals" VALUES('4eeaa4f3c243','2',-1.55710182643816058556e-01,-4.57389707501462239314e-01,7.72324366349906865636e-02,0.95,2000,0,'2026-12-03T16:26:58+00:00','2026-12-03T16:26:58+00:00');
CREATE TABLE "results" ("setup_id" TEXT, "removed" TEXT, "n_removed" INTEGER, "n_layers" INTEGER, "kept_layers" TEXT, "params" INTEGER, "params_non_embedding" INTEGER, "nll_sum" REAL, "n_tokens" INTEGER, "n_bytes" INTEGER, "ppl" REAL, "bpb" REAL, "prefill_ms" REAL, "prefill_iqr_ms" REAL, "prefill_repeats" INTEGER, "decode_ms_per_token" REAL, "decode_iqr_ms" REAL, "latency_signature" TEXT, "latency_from" TEXT, "status" TEXT, "error" TEXT, "eval_seconds" REAL, "latency_seconds" REAL, "device" TEXT, "host" TEXT, "measured_at" TEXT, "prefill_interval_pct" REAL, "decode_interval_pct" REAL, "latency_noisy" INTEGER, PRIMARY KEY ("setup_id", "removed"), FOREIGN KEY ("setup_id") REFERENCES "setups"("id"));
INSERT INTO "results" VALUES('4eeaa4f3c243','2',1,2,'0,1',37760,25472,6.82793055057525634767e+02,124,128,246.26190038046,7.94404963294288091191e+00,NULL,NULL,NULL,NULL,NULL,NULL,NULL,'ok',NULL,1.79949539960944093763e-03,NULL,'cpu','vm','2026-12-03T16:26:58+00:00',NULL,NULL,NULL);
INSERT INTO "results" VALUES('4eeaa4f3c243','',0,3,'0,1,2',50464,38176,6.82986286163330078144e+02,124,128,2.46645953244740866248e+02,7.94629780679844177626e+00,NULL,NULL,NULL,NULL,NULL,NULL,NULL,'ok',NULL,1.79949539960944093763e-03,NULL,'cpu','vm','2026-12-03T16:26:58+00:00',NULL,NULL,NULL);
INSERT INTO "results" VALUES('4eeaa4f3c243','1',1,2,'0,2',37760,25472,6.82562573909759521487e+02,124,128,2.45804593857405478734e+02,7.9413680683549738859e+00,NULL,NULL,NULL,NULL,NULL,NULL,NULL,'ok',NULL,1.79949539960944093763e-03,NULL,'cpu','vm','2026-12-03T16:26:58+00:00',NULL,NULL,NULL);
INSERT INTO "results" VALUES('4eeaa4f3c243','0',1,2,'1,2',37760,25472,6.82918340682983398453e+02,124,128,2.46510841250991461501e+02,7.94550728576983722462e+00,NULL,NULL,NULL,NULL,NULL,NULL,NULL,'ok',NULL,1.79949539960944093763e-03,NULL,'cpu','vm','2026-12-03T16:26:58+00:00',NULL,NULL,NULL);
INSERT INTO "results" VALUES('4eeaa4f3c243','0,1',2,1,'2',25056,12768,6.82333448410034179706e+02,124,128,2.45350818868034252777e+02,7.93870227624049729087e+00,NULL,NULL,NULL,NULL,NULL,NULL,NULL,'ok',NULL,1.79949539960944093763e-03,NULL,'cpu','vm','2026-12-03T16:26:58+00:00',NULL,NULL,NULL);
CREATE TABLE "runs" ("id" INTEGER PRIMARY KEY, "setup_id" TEXT, "status" TEXT, "pid" INTEGER, "host" TEXT, "command" TEXT, "planned" INTEGER, "to_measure" INTEGER, "measured" INTEGER, "started_at" TEXT, "heartbeat_at" TEXT, "ended_at" TEXT, "process_start" TEXT);
INSERT INTO "runs" VALUES(1,'4eeaa4f3c243','done',7784,'vm','/tmp/mkv4.py',5,5,5,'2026-12-03T16:26:58+00:00','2026-12-03T16:26:58+00:00','2026-12-03T16:26:58+00:00','3cf07293-3c58-4122-a663-495f0eff7eaa:1695476');
CREATE TABLE "schema_migrations" ("version" INTEGER, "description" TEXT, "applied_at" TEXT, PRIMARY KEY ("version"));
INSERT INTO "schema_migrations" VALUES(4,'created at schema version 4','2026-12-03T16:26:58+00:00');
CREATE TABLE "setups" ("id" TEXT, "model_id" INTEGER, "data" TEXT, "data_fingerprint" TEXT, "data_tokens" INTEGER, "max_length" INTEGER, "stride" INTEGER, "max_tokens" INTEGER, "latency_seq" INTEGER, "latency_settings" TEXT, "weights" TEXT, "device" TEXT, "engine_version" TEXT, "created_at" TEXT, PRIMARY KEY ("id"), FOREIGN KEY ("model_id") REFERENCES "models"("id"));
INSERT INTO "setups" VALUES('4eeaa4f3c243',1,'tests/data/sample.txt','46eb9034a0e90e2c',6002,32,32,128,128,'off','local:740d762aa1b9','cpu','2','2026-12-03T16:26:58+00:00');
CREATE TABLE "strategy_choices" ("model_id" INTEGER, "weights" TEXT, "calib_fingerprint" TEXT, "strategy" TEXT, "signal" TEXT, "n" INTEGER, "removed" TEXT, "score" REAL, "chosen_at" TEXT, PRIMARY KEY ("model_id", "weights", "calib_fingerprint", "strategy", "signal", "n"), FOREIGN KEY ("model_id") REFERENCES "models"("id"));
INSERT INTO "strategy_choices" VALUES(1,'local:740d762aa1b9','8f20924e9b428f85','greedy','calib-ppl',1,'1',2.53115050072273305658e+02,'2026-12-03T16:26:58+00:00');
INSERT INTO "strategy_choices" VALUES(1,'local:740d762aa1b9','8f20924e9b428f85','greedy','calib-ppl',2,'0,1',2.52668324566347081362e+02,'2026-12-03T16:26:58+00:00');
CREATE TABLE "task_results" ("setup_id" TEXT, "removed" TEXT, "heal_id" TEXT, "n_removed" INTEGER, "n_layers" INTEGER, "metric" TEXT, "value" REAL, "stderr" REAL, "metrics" TEXT, "n_samples" INTEGER, "status" TEXT, "error" TEXT, "eval_seconds" REAL, "device" TEXT, "host" TEXT, "measured_at" TEXT, PRIMARY KEY ("setup_id", "removed", "heal_id"), FOREIGN KEY ("setup_id") REFERENCES "task_setups"("id"));
CREATE TABLE "task_setups" ("id" TEXT, "model_id" INTEGER, "task" TEXT, "task_version" TEXT, "num_fewshot" INTEGER, "task_limit" INTEGER, "lm_eval_version" TEXT, "weights" TEXT, "dtype" TEXT, "device" TEXT, "engine_version" TEXT, "created_at" TEXT, PRIMARY KEY ("id"), FOREIGN KEY ("model_id") REFERENCES "models"("id"));
CREATE TABLE "window_losses" ("setup_id" TEXT, "removed" TEXT, "n_windows" INTEGER, "nll" BLOB, "tokens" BLOB, PRIMARY KEY ("setup_id", "removed"), FOREIGN KEY ("setup_id") REFERENCES "setups"("id"));
INSERT INTO "window_losses" VALUES('4eeaa4f3c243','2',4,X'000000FF2C3B6540000000EBB28C6540000000FEC19A6540000000CDBEF66440',X'1F0000001F0000001F0000001F000000');
INSERT INTO "window_losses" VALUES('4eeaa4f3c243','',4,X'00000019CA39654000000062CB8D6540000000A35F9B65400000008A9AFC6440',X'1F0000001F0000001F0000001F000000');
INSERT INTO "window_losses" VALUES('4eeaa4f3c243','1',4,X'0000004CC63A6540000000CD148B6540000000B423976540000000CE01F56440',X'1F0000001F0000001F0000001F000000');
INSERT INTO "window_losses" VALUES('4eeaa4f3c243','0',4,X'000000B86F3A6540000000775E8A65400000002CEE9C6540000000B1A6FB6440',X'1F0000001F0000001F0000001F000000');
INSERT INTO "window_losses" VALUES('4eeaa4f3c243','0,1',4,X'000000566D3B65400000009B11876540000000E7BD966540000000C46EF16440',X'1F0000001F0000001F0000001F000000');
CREATE UNIQUE INDEX "idx_models_name_revision_dtype" ON "models" ("name", "revision", "dtype");
CREATE INDEX "measurements_variant" ON "measurements" ("setup_id", "removed");
CREATE VIEW "results_vs_baseline" AS SELECT
    m.name AS model,
    r.setup_id AS setup,
    r.removed,
    r.n_removed,
    r.n_layers,
    r.ppl,
    r.prefill_ms AS speed_ms,
    r.params,
    CASE WHEN r.status IN ('racing', 'eliminated') THEN NULL ELSE 100.0 * (r.ppl / b.ppl - 1.0) END AS ppl_change_pct,
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
    r.measured_at,
    r.prefill_interval_pct AS speed_interval_pct,
    r.latency_noisy,
    i.low_pct AS ppl_change_low_pct,
    i.high_pct AS ppl_change_high_pct,
    w.n_windows
FROM results r
JOIN setups s ON s.id = r.setup_id
JOIN models m ON m.id = s.model_id
LEFT JOIN results b ON b.setup_id = r.setup_id AND b.removed = '' AND b.status = 'ok'
LEFT JOIN window_losses w ON w.setup_id = r.setup_id AND w.removed = r.removed
LEFT JOIN ppl_intervals i ON i.setup_id = r.setup_id AND i.removed = r.removed AND i.measured_at = r.measured_at
    AND i.baseline_at = b.measured_at;
COMMIT;
