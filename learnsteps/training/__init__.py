"""Lightning pieces shared by every training mode: run directories, loggers, trainers, EMA."""
