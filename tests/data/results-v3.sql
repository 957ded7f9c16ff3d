-- A version-3 results.db written by sweep at commit 3b9c11c (the release before per-window losses): a 3-layer
-- tiny GPT-2 (byte tokenizer) swept exhaustively with `sweep run`, latency shared (8 results with timings and
-- their intervals, a run with its process start, the measurement log).
-- Dumped with sqlite3's iterdump, plus the file's application_id; tests load it into a file.
BEGIN TRANSACTION;
CREATE TABLE "greedy_steps" ("model_id" INTEGER, "weights" TEXT, "calib_fingerprint" TEXT, "step" INTEGER, "layer" INTEGER, "removed" TEXT, "calib_ppl" REAL, "computed_at" TEXT, PRIMARY KEY ("model_id", "weights", "calib_fingerprint", "step"), FOREIGN KEY ("model_id") REFERENCES "models"("id"));
CREATE TABLE "heals" ("id" TEXT, "model_id" INTEGER, "setup_id" TEXT, "removed" TEXT, "n_removed" INTEGER, "n_layers" INTEGER, "method" TEXT, "lora_r" INTEGER, "lora_alpha" INTEGER, "lora_dropout" REAL, "lora_targets" TEXT, "steps" INTEGER, "lr" REAL, "batch_size" INTEGER, "seq" INTEGER, "data" TEXT, "data_fingerprint" TEXT, "eval_data" TEXT, "seed" INTEGER, "trainable_params" INTEGER, "heal_loss_before" REAL, "heal_loss_after" REAL, "eval_loss_before" REAL, "eval_loss_after" REAL, "ppl_unhealed" REAL, "nll_sum" REAL, "n_tokens" INTEGER, "ppl" REAL, "bpb" REAL, "status" TEXT, "error" TEXT, "train_seconds" REAL, "export_dir" TEXT, "settings" TEXT, "device" TEXT, "host" TEXT, "measured_at" TEXT, PRIMARY KEY ("id"), FOREIGN KEY ("model_id") REFERENCES "models"("id"));
CREATE TABLE "layer_similarity" ("model_id" INTEGER, "weights" TEXT, "calib_fingerprint" TEXT, "calib" TEXT, "metric" TEXT, "start" INTEGER, "size" INTEGER, "value" REAL, "n_sequences" INTEGER, "n_tokens" INTEGER, "computed_at" TEXT, PRIMARY KEY ("model_id", "weights", "calib_fingerprint", "metric", "start", "size"), FOREIGN KEY ("model_id") REFERENCES "models"("id"));
CREATE TABLE "measurements" ("id" INTEGER PRIMARY KEY, "setup_id" TEXT, "removed" TEXT, "status" TEXT, "run_id" INTEGER, "pid" INTEGER, "host" TEXT, "measured_at" TEXT);
INSERT INTO "measurements" VALUES(1,'853670c59963','0,1,2','ok',1,9372,'vm','2026-12-03T12:09:22+00:00');
INSERT INTO "measurements" VALUES(2,'853670c59963','1,2','ok',1,9372,'vm','2026-12-03T12:09:22+00:00');
INSERT INTO "measurements" VALUES(3,'853670c59963','2','ok',1,9372,'vm','2026-12-03T12:09:22+00:00');
INSERT INTO "measurements" VALUES(4,'853670c59963','','ok',1,9372,'vm','2026-12-03T12:09:22+00:00');
INSERT INTO "measurements" VALUES(5,'853670c59963','1','ok',1,9372,'vm','2026-12-03T12:09:22+00:00');
INSERT INTO "measurements" VALUES(6,'853670c59963','0,2','ok',1,9372,'vm','2026-12-03T12:09:22+00:00');
INSERT INTO "measurements" VALUES(7,'853670c59963','0','ok',1,9372,'vm','2026-12-03T12:09:22+00:00');
INSERT INTO "measurements" VALUES(8,'853670c59963','0,1','ok',1,9372,'vm','2026-12-03T12:09:22+00:00');
CREATE TABLE "meta" ("key" TEXT, "value" TEXT, PRIMARY KEY ("key"));
INSERT INTO "meta" VALUES('schema_version','3');
CREATE TABLE "models" ("id" INTEGER PRIMARY KEY, "name" TEXT, "revision" TEXT, "dtype" TEXT, "n_layers" INTEGER, "model_class" TEXT);
INSERT INTO "models" VALUES(1,'/tmp/i25/v3/tiny3','','float32',3,'GPT2LMHeadModel');
CREATE TABLE "results" ("setup_id" TEXT, "removed" TEXT, "n_removed" INTEGER, "n_layers" INTEGER, "kept_layers" TEXT, "params" INTEGER, "params_non_embedding" INTEGER, "nll_sum" REAL, "n_tokens" INTEGER, "n_bytes" INTEGER, "ppl" REAL, "bpb" REAL, "prefill_ms" REAL, "prefill_iqr_ms" REAL, "prefill_repeats" INTEGER, "decode_ms_per_token" REAL, "decode_iqr_ms" REAL, "latency_signature" TEXT, "latency_from" TEXT, "status" TEXT, "error" TEXT, "eval_seconds" REAL, "latency_seconds" REAL, "device" TEXT, "host" TEXT, "measured_at" TEXT, "prefill_interval_pct" REAL, "decode_interval_pct" REAL, "latency_noisy" INTEGER, PRIMARY KEY ("setup_id", "removed"), FOREIGN KEY ("setup_id") REFERENCES "setups"("id"));
INSERT INTO "results" VALUES('853670c59963','0,1,2',3,0,'',12352,64,6.82210502147674560527e+02,124,128,2.45107673571469774752e+02,7.93727184105499716793e+00,1.25102600009086017962e+00,2.29779000108010222902e-01,46,6.66916874990874930517e-01,8.78171875200450813281e-02,'0','0,1,2','ok',NULL,2.95307675000344715954e-03,NULL,'cpu','vm','2026-12-03T12:09:22+00:00',5.20972885744275515662e+00,4.0087548400291206363e+00,1);
INSERT INTO "results" VALUES('853670c59963','1,2',2,1,'0',25056,12768,6.82394264221191406251e+02,124,128,2.45471180712550307145e+02,7.93940984615311151628e+00,1.95629849997658311622e+00,3.42282750011690950486e-01,46,1.30688224999175872653e+00,2.06525187465445014822e-01,'1x6616e185','0,1','ok',NULL,2.95307675000344715954e-03,NULL,'cpu','vm','2026-12-03T12:09:22+00:00',5.01089174408047366426e+00,5.12101415462196118966e+00,1);
INSERT INTO "results" VALUES('853670c59963','2',1,2,'0,1',37760,25472,6.82793055057525634767e+02,124,128,246.26190038046,7.94404963294288091191e+00,2.81004850000954320421e+00,5.74327500146409875014e-01,46,1.91790087501431116834e+00,3.35743250005293702997e-01,'2x6616e185','0','ok',NULL,2.95307675000344715954e-03,NULL,'cpu','vm','2026-12-03T12:09:22+00:00',6.03557376162552383647e+00,3.44720582176854328793e+00,1);
INSERT INTO "results" VALUES('853670c59963','',0,3,'0,1,2',50464,38176,6.82986286163330078144e+02,124,128,2.46645953244740866248e+02,7.94629780679844177626e+00,3.827463499987970863e+00,9.03638249894811451667e-01,46,2.63395200002491947088e+00,4.97672062479637133947e-01,'3x6616e185','','ok',NULL,2.95307675000344715954e-03,NULL,'cpu','vm','2026-12-03T12:09:22+00:00',5.75727812165005570221e+00,5.22996670068900559869e+00,1);
INSERT INTO "results" VALUES('853670c59963','1',1,2,'0,2',37760,25472,6.82562573909759521487e+02,124,128,2.45804593857405478734e+02,7.9413680683549738859e+00,2.81004850000954320421e+00,5.74327500146409875014e-01,46,1.91790087501431116834e+00,3.35743250005293702997e-01,'2x6616e185','0','ok',NULL,2.95307675000344715954e-03,NULL,'cpu','vm','2026-12-03T12:09:22+00:00',6.03557376162552383647e+00,3.44720582176854328793e+00,1);
INSERT INTO "results" VALUES('853670c59963','0,2',2,1,'1',25056,12768,6.82754463672637939468e+02,124,128,2.46185270468549873609e+02,7.94360063617192491136e+00,1.95629849997658311622e+00,3.42282750011690950486e-01,46,1.30688224999175872653e+00,2.06525187465445014822e-01,'1x6616e185','0,1','ok',NULL,2.95307675000344715954e-03,NULL,'cpu','vm','2026-12-03T12:09:22+00:00',5.01089174408047366426e+00,5.12101415462196118966e+00,1);
INSERT INTO "results" VALUES('853670c59963','0',1,2,'1,2',37760,25472,6.82918340682983398453e+02,124,128,2.46510841250991461501e+02,7.94550728576983722462e+00,2.81004850000954320421e+00,5.74327500146409875014e-01,46,1.91790087501431116834e+00,3.35743250005293702997e-01,'2x6616e185','0','ok',NULL,2.95307675000344715954e-03,NULL,'cpu','vm','2026-12-03T12:09:22+00:00',6.03557376162552383647e+00,3.44720582176854328793e+00,1);
INSERT INTO "results" VALUES('853670c59963','0,1',2,1,'2',25056,12768,6.82333448410034179706e+02,124,128,2.45350818868034252777e+02,7.93870227624049729087e+00,1.95629849997658311622e+00,3.42282750011690950486e-01,46,1.30688224999175872653e+00,2.06525187465445014822e-01,'1x6616e185','0,1','ok',NULL,2.95307675000344715954e-03,NULL,'cpu','vm','2026-12-03T12:09:22+00:00',5.01089174408047366426e+00,5.12101415462196118966e+00,1);
CREATE TABLE "runs" ("id" INTEGER PRIMARY KEY, "setup_id" TEXT, "status" TEXT, "pid" INTEGER, "host" TEXT, "command" TEXT, "planned" INTEGER, "to_measure" INTEGER, "measured" INTEGER, "started_at" TEXT, "heartbeat_at" TEXT, "ended_at" TEXT, "process_start" TEXT);
INSERT INTO "runs" VALUES(1,'853670c59963','done',9372,'vm','mkv3.py',8,8,8,'2026-12-03T12:09:22+00:00','2026-12-03T12:09:24+00:00','2026-12-03T12:09:24+00:00','3cf07293-3c58-4122-a663-495f0eff7eaa:149702');
CREATE TABLE "schema_migrations" ("version" INTEGER, "description" TEXT, "applied_at" TEXT, PRIMARY KEY ("version"));
INSERT INTO "schema_migrations" VALUES(3,'created at schema version 3','2026-12-03T12:09:22+00:00');
CREATE TABLE "setups" ("id" TEXT, "model_id" INTEGER, "data" TEXT, "data_fingerprint" TEXT, "data_tokens" INTEGER, "max_length" INTEGER, "stride" INTEGER, "max_tokens" INTEGER, "latency_seq" INTEGER, "latency_settings" TEXT, "weights" TEXT, "device" TEXT, "engine_version" TEXT, "created_at" TEXT, PRIMARY KEY ("id"), FOREIGN KEY ("model_id") REFERENCES "models"("id"));
INSERT INTO "setups" VALUES('853670c59963',1,'/tmp/i25/v3/text.txt','80cd79d143e4cdff',2000,32,32,128,16,'shared:seq=16:decode=4:repeats=5-50:precision=0.03:budget=2:warmup=1:seed=0','local:4c0b3031da24','cpu','2','2026-12-03T12:09:22+00:00');
CREATE TABLE "strategy_choices" ("model_id" INTEGER, "weights" TEXT, "calib_fingerprint" TEXT, "strategy" TEXT, "signal" TEXT, "n" INTEGER, "removed" TEXT, "score" REAL, "chosen_at" TEXT, PRIMARY KEY ("model_id", "weights", "calib_fingerprint", "strategy", "signal", "n"), FOREIGN KEY ("model_id") REFERENCES "models"("id"));
CREATE TABLE "task_results" ("setup_id" TEXT, "removed" TEXT, "heal_id" TEXT, "n_removed" INTEGER, "n_layers" INTEGER, "metric" TEXT, "value" REAL, "stderr" REAL, "metrics" TEXT, "n_samples" INTEGER, "status" TEXT, "error" TEXT, "eval_seconds" REAL, "device" TEXT, "host" TEXT, "measured_at" TEXT, PRIMARY KEY ("setup_id", "removed", "heal_id"), FOREIGN KEY ("setup_id") REFERENCES "task_setups"("id"));
CREATE TABLE "task_setups" ("id" TEXT, "model_id" INTEGER, "task" TEXT, "task_version" TEXT, "num_fewshot" INTEGER, "task_limit" INTEGER, "lm_eval_version" TEXT, "weights" TEXT, "dtype" TEXT, "device" TEXT, "engine_version" TEXT, "created_at" TEXT, PRIMARY KEY ("id"), FOREIGN KEY ("model_id") REFERENCES "models"("id"));
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
    r.measured_at,
    r.prefill_interval_pct AS speed_interval_pct,
    r.latency_noisy
FROM results r
JOIN setups s ON s.id = r.setup_id
JOIN models m ON m.id = s.model_id
LEFT JOIN results b ON b.setup_id = r.setup_id AND b.removed = '' AND b.status = 'ok';
COMMIT;
PRAGMA application_id = 1398228304;
