from services.memory.service import MemoryService

MemoryService.main()
