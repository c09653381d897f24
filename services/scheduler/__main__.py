from services.scheduler.service import SchedulerService

SchedulerService.main()
