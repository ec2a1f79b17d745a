"""The training wing: the job (:mod:`.job`), its LightningModule (:mod:`.module`), callbacks, EMA,
learning-rate schedules and checkpoint reading and writing."""
