-- A version-2 results.db written by sweep at commit 79069b1 (the release before runs.process_start): a 3-layer
-- tiny GPT-2 (byte tokenizer) swept exhaustively with `sweep run` (8 results, a run, the measurement log).
-- Dumped with sqlite3's iterdump, plus the file's application_id; tests load it into a file.
BEGIN TRANSACTION;
CREATE TABLE "greedy_steps" ("model_id" INTEGER, "weights" TEXT, "calib_fingerprint" TEXT, "step" INTEGER, "layer" INTEGER, "removed" TEXT, "calib_ppl" REAL, "computed_at" TEXT, PRIMARY KEY ("model_id", "weights", "calib_fingerprint", "step"), FOREIGN KEY ("model_id") REFERENCES "models"("id"));
CREATE TABLE "heals" ("id" TEXT, "model_id" INTEGER, "setup_id" TEXT, "removed" TEXT, "n_removed" INTEGER, "n_layers" INTEGER, "method" TEXT, "lora_r" INTEGER, "lora_alpha" INTEGER, "lora_dropout" REAL, "lora_targets" TEXT, "steps" INTEGER, "lr" REAL, "batch_size" INTEGER, "seq" INTEGER, "data" TEXT, "data_fingerprint" TEXT, "eval_data" TEXT, "seed" INTEGER, "trainable_params" INTEGER, "heal_loss_before" REAL, "heal_loss_after" REAL, "eval_loss_before" REAL, "eval_loss_after" REAL, "ppl_unhealed" REAL, "nll_sum" REAL, "n_tokens" INTEGER, "ppl" REAL, "bpb" REAL, "status" TEXT, "error" TEXT, "train_seconds" REAL, "export_dir" TEXT, "settings" TEXT, "device" TEXT, "host" TEXT, "measured_at" TEXT, PRIMARY KEY ("id"), FOREIGN KEY ("model_id") REFERENCES "models"("id"));
CREATE TABLE "layer_similarity" ("model_id" INTEGER, "weights" TEXT, "calib_fingerprint" TEXT, "calib" TEXT, "metric" TEXT, "start" INTEGER, "size" INTEGER, "value" REAL, "n_sequences" INTEGER, "n_tokens" INTEGER, "computed_at" TEXT, PRIMARY KEY ("model_id", "weights", "calib_fingerprint", "metric", "start", "size"), FOREIGN KEY ("model_id") REFERENCES "models"("id"));
CREATE TABLE "measurements" ("id" INTEGER PRIMARY KEY, "setup_id" TEXT, "removed" TEXT, "status" TEXT, "run_id" INTEGER, "pid" INTEGER, "host" TEXT, "measured_at" TEXT);
INSERT INTO "measurements" VALUES(1,'38f42ce96980','0,1,2','ok',1,29912,'vm','2026-11-26T15:18:21+00:00');
INSERT INTO "measurements" VALUES(2,'38f42ce96980','1,2','ok',1,29912,'vm','2026-11-26T15:18:21+00:00');
INSERT INTO "measurements" VALUES(3,'38f42ce96980','2','ok',1,29912,'vm','2026-11-26T15:18:21+00:00');
INSERT INTO "measurements" VALUES(4,'38f42ce96980','','ok',1,29912,'vm','2026-11-26T15:18:21+00:00');
INSERT INTO "measurements" VALUES(5,'38f42ce96980','1','ok',1,29912,'vm','2026-11-26T15:18:21+00:00');
INSERT INTO "measurements" VALUES(6,'38f42ce96980','0,2','ok',1,29912,'vm','2026-11-26T15:18:21+00:00');
INSERT INTO "measurements" VALUES(7,'38f42ce96980','0','ok',1,29912,'vm','2026-11-26T15:18:21+00:00');
INSERT INTO "measurements" VALUES(8,'38f42ce96980','0,1','ok',1,29912,'vm','2026-11-26T15:18:21+00:00');
CREATE TABLE "meta" ("key" TEXT, "value" TEXT, PRIMARY KEY ("key"));
INSERT INTO "meta" VALUES('schema_version','2');
CREATE TABLE "models" ("id" INTEGER PRIMARY KEY, "name" TEXT, "revision" TEXT, "dtype" TEXT, "n_layers" INTEGER, "model_class" TEXT);
INSERT INTO "models" VALUES(1,'/tmp/i13/v2/tiny3','','float32',3,'GPT2LMHeadModel');
CREATE TABLE "results" ("setup_id" TEXT, "removed" TEXT, "n_removed" INTEGER, "n_layers" INTEGER, "kept_layers" TEXT, "params" INTEGER, "params_non_embedding" INTEGER, "nll_sum" REAL, "n_tokens" INTEGER, "n_bytes" INTEGER, "ppl" REAL, "bpb" REAL, "prefill_ms" REAL, "prefill_iqr_ms" REAL, "prefill_repeats" INTEGER, "decode_ms_per_token" REAL, "decode_iqr_ms" REAL, "latency_signature" TEXT, "latency_from" TEXT, "status" TEXT, "error" TEXT, "eval_seconds" REAL, "latency_seconds" REAL, "device" TEXT, "host" TEXT, "measured_at" TEXT, PRIMARY KEY ("setup_id", "removed"), FOREIGN KEY ("setup_id") REFERENCES "setups"("id"));
INSERT INTO "results" VALUES('38f42ce96980','0,1,2',3,0,'',5152,32,6.83792368412017822262e+02,124,128,2.48254538310308674902e+02,7.95567628149788053093e+00,NULL,NULL,NULL,NULL,NULL,NULL,NULL,'ok',NULL,7.64510093749777297489e-02,NULL,'cpu','vm','2026-11-26T15:18:21+00:00');
INSERT INTO "results" VALUES('38f42ce96980','1,2',2,1,'0',8432,3312,6.83883670330047607407e+02,124,128,2.48437396876049263025e+02,7.95673854621050402613e+00,NULL,NULL,NULL,NULL,NULL,NULL,NULL,'ok',NULL,7.64510093749777297489e-02,NULL,'cpu','vm','2026-11-26T15:18:21+00:00');
INSERT INTO "results" VALUES('38f42ce96980','2',1,2,'0,1',11712,6592,6.83882261276245117208e+02,124,128,2.48434573814195715614e+02,7.95672215238039637341e+00,NULL,NULL,NULL,NULL,NULL,NULL,NULL,'ok',NULL,7.64510093749777297489e-02,NULL,'cpu','vm','2026-11-26T15:18:21+00:00');
INSERT INTO "results" VALUES('38f42ce96980','',0,3,'0,1,2',14992,9872,6.83893600940704345699e+02,124,128,2.4845729392326330754e+02,7.95685408526491855241e+00,NULL,NULL,NULL,NULL,NULL,NULL,NULL,'ok',NULL,7.64510093749777297489e-02,NULL,'cpu','vm','2026-11-26T15:18:21+00:00');
INSERT INTO "results" VALUES('38f42ce96980','1',1,2,'0,2',11712,6592,6.83904725551605224614e+02,124,128,2.48479585170918511501e+02,7.95698351607926124273e+00,NULL,NULL,NULL,NULL,NULL,NULL,NULL,'ok',NULL,7.64510093749777297489e-02,NULL,'cpu','vm','2026-11-26T15:18:21+00:00');
INSERT INTO "results" VALUES('38f42ce96980','0,2',2,1,'1',8432,3312,6.83795537471771240232e+02,124,128,2.48260883016109545461e+02,7.95571315235909448659e+00,NULL,NULL,NULL,NULL,NULL,NULL,NULL,'ok',NULL,7.64510093749777297489e-02,NULL,'cpu','vm','2026-11-26T15:18:21+00:00');
INSERT INTO "results" VALUES('38f42ce96980','0',1,2,'1,2',11712,6592,6.83774402618408203144e+02,124,128,2.48218572449723978929e+02,7.95546725600315340898e+00,NULL,NULL,NULL,NULL,NULL,NULL,NULL,'ok',NULL,7.64510093749777297489e-02,NULL,'cpu','vm','2026-11-26T15:18:21+00:00');
INSERT INTO "results" VALUES('38f42ce96980','0,1',2,1,'2',8432,3312,6.83784811019897460944e+02,124,128,2.48239408473856798314e+02,7.95558835398067,NULL,NULL,NULL,NULL,NULL,NULL,NULL,'ok',NULL,7.64510093749777297489e-02,NULL,'cpu','vm','2026-11-26T15:18:21+00:00');
CREATE TABLE "runs" ("id" INTEGER PRIMARY KEY, "setup_id" TEXT, "status" TEXT, "pid" INTEGER, "host" TEXT, "command" TEXT, "planned" INTEGER, "to_measure" INTEGER, "measured" INTEGER, "started_at" TEXT, "heartbeat_at" TEXT, "ended_at" TEXT);
INSERT INTO "runs" VALUES(1,'38f42ce96980','done',29912,'vm','/tmp/i13/mkv2.py',8,8,8,'2026-11-26T15:18:20+00:00','2026-11-26T15:18:21+00:00','2026-11-26T15:18:21+00:00');
CREATE TABLE "schema_migrations" ("version" INTEGER, "description" TEXT, "applied_at" TEXT, PRIMARY KEY ("version"));
INSERT INTO "schema_migrations" VALUES(2,'created at schema version 2','2026-11-26T15:18:20+00:00');
CREATE TABLE "setups" ("id" TEXT, "model_id" INTEGER, "data" TEXT, "data_fingerprint" TEXT, "data_tokens" INTEGER, "max_length" INTEGER, "stride" INTEGER, "max_tokens" INTEGER, "latency_seq" INTEGER, "latency_settings" TEXT, "weights" TEXT, "device" TEXT, "engine_version" TEXT, "created_at" TEXT, PRIMARY KEY ("id"), FOREIGN KEY ("model_id") REFERENCES "models"("id"));
INSERT INTO "setups" VALUES('38f42ce96980',1,'/tmp/i13/v2/text.txt','d5db0d9001139e31',2000,32,32,128,128,'off','local:44c7761a80c2','cpu','1','2026-11-26T15:18:20+00:00');
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
    r.measured_at
FROM results r
JOIN setups s ON s.id = r.setup_id
JOIN models m ON m.id = s.model_id
LEFT JOIN results b ON b.setup_id = r.setup_id AND b.removed = '' AND b.status = 'ok';
COMMIT;
PRAGMA application_id = 1398228304;
