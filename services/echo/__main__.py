from services.echo.service import EchoService

EchoService.main()
