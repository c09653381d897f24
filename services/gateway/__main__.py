from services.gateway.service import GatewayService

GatewayService.main()
